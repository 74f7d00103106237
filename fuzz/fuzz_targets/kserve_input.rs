//! A KServe v2 inference request's input, field by field: name, datatype,
//! shape, parameters, typed contents and raw contents. What is accepted must
//! become model inputs that preprocessing takes (FP32) or images to decode
//! (BYTES), one per image of the declared batch.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rws::serve::preprocess::{Input, to_chw};
use rws::server::kserve;
use rws::server::kserve::pb::InferTensorContents;
use rws::server::kserve::pb::model_infer_request::InferInputTensor;

#[derive(Arbitrary, Debug)]
struct Request {
    other_name: bool,
    datatype: u8,
    shape: Vec<i64>,
    parameter: bool,
    typed: Option<(Vec<f32>, Vec<Vec<u8>>)>,
    raw: Vec<Vec<u8>>,
    second_input: bool,
}

fuzz_target!(|r: Request| {
    let cfg = &rws_fuzz::configs()[0];
    let datatype = ["FP32", "BYTES", "INT8", ""][r.datatype as usize % 4];
    let mut parameters = HashMap::new();
    if r.parameter {
        parameters.insert("shared_memory_region".to_string(), Default::default());
    }
    let tensor = InferInputTensor {
        name: if r.other_name { "x" } else { "input" }.into(),
        datatype: datatype.into(),
        shape: r.shape,
        parameters,
        contents: r.typed.map(|(fp32, bytes)| InferTensorContents {
            fp32_contents: fp32,
            bytes_contents: bytes,
            ..Default::default()
        }),
    };
    let mut inputs = vec![tensor.clone()];
    if r.second_input {
        inputs.push(tensor);
    }
    let Ok(images) = kserve::images(inputs, r.raw, cfg) else {
        return;
    };
    assert!(!images.is_empty());
    for input in &images {
        if let Input::Tensor { shape, .. } = input {
            let [h, w] = cfg.input_size;
            assert_eq!(shape, &[cfg.channels, h, w]);
        }
        let _ = to_chw(input, cfg);
    }
});
