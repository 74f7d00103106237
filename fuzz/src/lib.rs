//! What the fuzz targets share: the shipped model, loaded once, and the
//! configurations images are decoded for.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use rws::model::Model;
use rws::model::repo::ModelConfig;

/// The repository's `models/mnist-resnet`.
pub fn model() -> &'static Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mnist-resnet");
        let config = ModelConfig::load(&dir.join("model.toml")).expect("the shipped model.toml");
        let base = dir.join("base.safetensors");
        Arc::new(Model::load(config, &base, &Device::Cpu).expect("the shipped model"))
    })
}

/// The shipped model's input (grey 28×28), and an RGB one of a typical camera
/// model's size, so both decode paths are reached.
pub fn configs() -> &'static [ModelConfig; 2] {
    static CONFIGS: OnceLock<[ModelConfig; 2]> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let grey = model().config.clone();
        let mut rgb = grey.clone();
        rgb.channels = 3;
        rgb.input_size = [64, 48];
        rgb.mean = vec![0.485, 0.456, 0.406];
        rgb.std = vec![0.229, 0.224, 0.225];
        [grey, rgb]
    })
}
