//! The library's serving API: one model, its signatures and profiles, and
//! classification. The gRPC layer is a thin translation of this.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use tokio::sync::oneshot;

use crate::batch::{BatchConfig, Batcher, Job};
use crate::model::Model;
use crate::preprocess::{self, Input};
use crate::profile::{LoadedSignature, Registry, SignatureRef};
use crate::repo::{self, ModelDir};
use crate::signature::Signature;
use crate::{Result, bail};

/// Default number of classes returned.
pub const DEFAULT_TOP_K: usize = 5;
/// Largest signature accepted, from disk or uploaded.
pub const MAX_SIGNATURE_BYTES: usize = 256 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub index: usize,
    pub label: String,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub top_k: Vec<Prediction>,
    pub profile: String,
    pub generation: u64,
    /// Empty unless asked for.
    pub logits: Vec<f32>,
}

pub struct EngineOptions {
    pub max_resident_profiles: usize,
    pub batch: BatchConfig,
    /// Load every file in `signatures/` and define a profile of the same name
    /// (`name = [name@default_alpha]`) for each.
    pub auto_profiles: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_resident_profiles: 16,
            batch: BatchConfig::default(),
            auto_profiles: true,
        }
    }
}

pub struct Engine {
    dir: ModelDir,
    registry: Arc<Registry>,
    batcher: Batcher,
}

impl Engine {
    pub fn open(dir: ModelDir, device: &Device, opts: &EngineOptions) -> Result<Self> {
        let model = Model::load(dir.config.clone(), &dir.base_path(), device)?;
        let registry = Arc::new(Registry::new(Arc::new(model), opts.max_resident_profiles)?);
        let batcher = Batcher::start(registry.clone(), opts.batch)?;
        let engine = Engine {
            dir,
            registry,
            batcher,
        };
        if opts.auto_profiles {
            for path in engine.dir.signature_files()? {
                let name = repo::signature_name(&path);
                let sig = engine.read_signature(&path)?;
                let alpha = sig.meta.default_alpha;
                engine.registry.load_signature(&name, sig, false)?;
                engine.registry.put_profile(
                    &name,
                    vec![SignatureRef {
                        name: name.clone(),
                        alpha,
                    }],
                    false,
                )?;
                tracing::info!(signature = %name, alpha, "loaded signature and defined its profile");
            }
        }
        Ok(engine)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn model(&self) -> &Arc<Model> {
        self.registry.model()
    }

    pub fn model_dir(&self) -> &ModelDir {
        &self.dir
    }

    fn read_signature(&self, path: &std::path::Path) -> Result<Signature> {
        let len = std::fs::metadata(path)
            .map_err(|e| crate::Error::io(path, e))?
            .len();
        if len > MAX_SIGNATURE_BYTES as u64 {
            bail!(
                ResourceExhausted,
                "{} is {len} bytes; signatures are limited to {MAX_SIGNATURE_BYTES}",
                path.display()
            );
        }
        Signature::load(path)
    }

    /// Loads a signature from a path relative to the model directory.
    pub fn load_signature_path(
        &self,
        name: Option<&str>,
        rel: &str,
        allow_transfer: bool,
    ) -> Result<Arc<LoadedSignature>> {
        let path = self.dir.confine(rel)?;
        let name = name
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| repo::signature_name(&path));
        let sig = self.read_signature(&path)?;
        self.registry.load_signature(&name, sig, allow_transfer)
    }

    /// Loads an uploaded signature.
    pub fn load_signature_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        allow_transfer: bool,
    ) -> Result<Arc<LoadedSignature>> {
        if name.is_empty() {
            bail!(InvalidArgument, "an uploaded signature needs a name");
        }
        if bytes.len() > MAX_SIGNATURE_BYTES {
            bail!(
                ResourceExhausted,
                "signature is {} bytes; the limit is {MAX_SIGNATURE_BYTES}",
                bytes.len()
            );
        }
        self.registry
            .load_signature(name, Signature::from_bytes(bytes)?, allow_transfer)
    }

    /// Requests waiting for a compute worker.
    pub fn queue_depth(&self) -> usize {
        self.batcher.queue_depth()
    }

    /// Classifies one input with the named profile (empty: the default). The
    /// input is decoded on tokio's blocking pool, then batched with other
    /// requests on the compute workers; it is dropped uncomputed if `deadline`
    /// passes while it waits.
    pub async fn classify(
        self: &Arc<Self>,
        input: Input,
        profile: String,
        top_k: usize,
        with_logits: bool,
        deadline: Option<Instant>,
    ) -> Result<Classification> {
        let engine = self.clone();
        let input = tokio::task::spawn_blocking(move || {
            let _s = tracing::debug_span!("decode").entered();
            preprocess::to_chw(&input, &engine.model().config)
        })
        .await
        .map_err(|e| crate::Error::Internal(format!("decoder failed: {e}")))??;
        let (reply, answer) = oneshot::channel();
        self.batcher.submit(Job {
            input,
            profile,
            top_k,
            with_logits,
            deadline,
            queued: Instant::now(),
            reply,
        })?;
        answer
            .await
            .map_err(|_| crate::Error::Internal("compute worker dropped the request".into()))?
    }
}

/// Softmax scores of the `k` largest logits (0 means [`DEFAULT_TOP_K`]).
pub fn top_k_of(logits: &[f32], labels: &[String], k: usize) -> Vec<Prediction> {
    let k = if k == 0 { DEFAULT_TOP_K } else { k }.min(logits.len());
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|i| Prediction {
            index: i,
            label: labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
            score: exp[i] / sum,
        })
        .collect()
}
