//! The RWS file format: a safetensors file of per-tensor deltas plus metadata.
//!
//! For a base tensor `T` (torchvision name, e.g. `layer1.0.conv1.weight`) a file holds one of:
//! - `T` as F32 or F16: the delta itself, same shape as the base tensor;
//! - `T.q8` (U8, base shape) with `T.scale` and `T.offset` (F32, one per output channel):
//!   value = q · scale + offset;
//! - `T.q4` (U8, `[O, ceil(J/2)]`, two codes per byte, low nibble first) with `T.scale`, `T.offset`.
//!
//! 1-D tensors (BatchNorm parameters and running statistics) are stored as F32 or F16.
//! A `*.running_var` delta is a log ratio: the kernel scales the variance by
//! `exp(alpha · delta)`, so it stays positive at every alpha.
//! Metadata keys: `rws.format` (= "1"), `rws.arch`, `rws.base_fingerprint`,
//! `rws.corruption`, `rws.default_alpha`, `rws.synthetic`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use safetensors::{Dtype, tensor::TensorView};

use crate::patch::quant::{Delta, DeltaView, Quant};
use crate::{Error, Result, bail};

pub const FORMAT_VERSION: &str = "1";

#[derive(Debug, Clone, PartialEq)]
pub struct SignatureMeta {
    pub arch: String,
    pub base_fingerprint: String,
    /// The corruption it buys robustness against, e.g. "fog".
    pub corruption: String,
    pub default_alpha: f32,
    /// Generated rather than extracted from trained models.
    pub synthetic: bool,
}

/// One base tensor's delta.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorDelta {
    pub shape: Vec<usize>,
    pub delta: Delta,
}

impl TensorDelta {
    /// Rows (output channels) and elements per row of the delta.
    fn rows_cols(&self) -> (usize, usize) {
        let rows = self.shape.first().copied().unwrap_or(1);
        let n: usize = self.shape.iter().product();
        (rows, n / rows.max(1))
    }
}

/// A loaded, internally consistent signature.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub meta: SignatureMeta,
    deltas: BTreeMap<String, TensorDelta>,
}

impl Signature {
    pub fn new(meta: SignatureMeta, deltas: BTreeMap<String, TensorDelta>) -> Result<Self> {
        let sig = Signature { meta, deltas };
        sig.check_consistent()?;
        Ok(sig)
    }

    /// The delta for a base tensor, if this signature patches it.
    pub fn delta(&self, tensor: &str) -> Option<DeltaView<'_>> {
        self.deltas.get(tensor).map(|d| d.delta.view())
    }

    pub fn deltas(&self) -> &BTreeMap<String, TensorDelta> {
        &self.deltas
    }

    /// Bytes of delta data held in memory.
    pub fn stored_bytes(&self) -> usize {
        self.deltas.values().map(|d| d.delta.stored_bytes()).sum()
    }

    /// Storage forms of the multi-dimensional deltas, e.g. "int8" (1-D ones are always float).
    pub fn quant_summary(&self) -> String {
        let forms: BTreeSet<String> = self
            .deltas
            .values()
            .filter(|d| d.shape.len() > 1)
            .map(|d| d.delta.quant().to_string())
            .collect();
        forms.into_iter().collect::<Vec<_>>().join(",")
    }

    /// The same signature with every multi-dimensional delta stored as `quant`.
    pub fn quantized(&self, quant: Quant) -> Signature {
        let deltas = self
            .deltas
            .iter()
            .map(|(name, d)| {
                let (rows, _) = d.rows_cols();
                let q = match (d.shape.len(), quant) {
                    (1, Quant::Int8 | Quant::Int4) => Quant::F32,
                    _ => quant,
                };
                let delta = Delta::quantize(&d.delta.dequantize(), rows, q);
                (
                    name.clone(),
                    TensorDelta {
                        shape: d.shape.clone(),
                        delta,
                    },
                )
            })
            .collect();
        Signature {
            meta: self.meta.clone(),
            deltas,
        }
    }

    fn check_consistent(&self) -> Result<()> {
        if !self.meta.default_alpha.is_finite() {
            bail!(InvalidArgument, "signature default alpha is not finite");
        }
        if self.deltas.is_empty() {
            bail!(InvalidArgument, "signature holds no deltas");
        }
        for (name, d) in &self.deltas {
            let (rows, cols) = d.rows_cols();
            let view = d.delta.view();
            if d.shape.len() == 1 && matches!(d.delta.quant(), Quant::Int8 | Quant::Int4) {
                bail!(
                    InvalidArgument,
                    "delta {name} is 1-D; it must be stored as f32 or f16"
                );
            }
            view.check_layout(rows, cols)
                .map_err(|e| Error::InvalidArgument(format!("delta {name}: {e}")))?;
            if let Some(i) = view.first_non_finite() {
                bail!(
                    InvalidArgument,
                    "delta {name} holds NaN or Inf (element {i})"
                );
            }
        }
        Ok(())
    }

    /// Parses and checks a signature file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (st, md) = crate::tensorfile::read(bytes, "signature")?;
        md.check_version("rws.format", FORMAT_VERSION)?;
        let default_alpha: f32 = md
            .require("rws.default_alpha")?
            .parse()
            .map_err(|_| Error::InvalidArgument("rws.default_alpha is not a number".into()))?;
        let meta = SignatureMeta {
            arch: md.require("rws.arch")?,
            base_fingerprint: md.require("rws.base_fingerprint")?,
            corruption: md.get("rws.corruption").cloned().unwrap_or_default(),
            default_alpha,
            synthetic: md.get("rws.synthetic").is_some_and(|v| v == "true"),
        };

        let views: HashMap<&str, TensorView> = st.iter().collect();
        let f32s = |name: &str| -> Result<Vec<f32>> {
            let v = views
                .get(name)
                .ok_or_else(|| Error::InvalidArgument(format!("signature lacks {name}")))?;
            if v.dtype() != Dtype::F32 {
                bail!(InvalidArgument, "{name} must be F32");
            }
            Ok(le_f32(v.data()))
        };
        let mut deltas = BTreeMap::new();
        for (key, view) in &views {
            let (base, q) = match key.rsplit_once('.') {
                Some((b, "q8")) => (b, Some(Quant::Int8)),
                Some((b, "q4")) => (b, Some(Quant::Int4)),
                Some((b, "scale" | "offset"))
                    if views.contains_key(format!("{b}.q8").as_str())
                        || views.contains_key(format!("{b}.q4").as_str()) =>
                {
                    continue;
                }
                _ => (*key, None),
            };
            let (shape, delta) = match (q, view.dtype()) {
                (None, Dtype::F32) => (view.shape().to_vec(), Delta::F32(le_f32(view.data()))),
                (None, Dtype::F16) => (
                    view.shape().to_vec(),
                    Delta::F16(
                        view.data()
                            .chunks_exact(2)
                            .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                            .collect(),
                    ),
                ),
                (Some(q), Dtype::U8) => {
                    let scale = f32s(&format!("{base}.scale"))?;
                    let offset = f32s(&format!("{base}.offset"))?;
                    let shape = view.shape().to_vec();
                    let rows = shape.first().copied().unwrap_or(0);
                    let data = view.data().to_vec();
                    let (shape, delta) = if q == Quant::Int8 {
                        let cols = data.len() / rows.max(1);
                        (
                            shape,
                            Delta::Int8 {
                                cols,
                                q: data,
                                scale,
                                offset,
                            },
                        )
                    } else {
                        // The packed shape does not say whether the last column is
                        // padding, so the logical shape travels in the metadata.
                        let logical: Vec<usize> = md
                            .get(&format!("rws.shape.{base}"))
                            .ok_or_else(|| {
                                Error::InvalidArgument(format!(
                                    "signature lacks the shape of {base}"
                                ))
                            })?
                            .split(',')
                            .map(|s| s.trim().parse::<usize>())
                            .collect::<std::result::Result<_, _>>()
                            .map_err(|_| Error::InvalidArgument(format!("bad shape for {base}")))?;
                        let cols = logical.iter().product::<usize>() / rows.max(1);
                        (
                            logical,
                            Delta::Int4 {
                                cols,
                                q: data,
                                scale,
                                offset,
                            },
                        )
                    };
                    (shape, delta)
                }
                (_, dt) => bail!(
                    InvalidArgument,
                    "tensor {key} has unsupported dtype {dt:?} for a signature delta"
                ),
            };
            if deltas
                .insert(base.to_string(), TensorDelta { shape, delta })
                .is_some()
            {
                bail!(InvalidArgument, "signature holds two deltas for {base}");
            }
        }
        Signature::new(meta, deltas)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut md = HashMap::from([
            ("rws.format".to_string(), FORMAT_VERSION.to_string()),
            ("rws.arch".to_string(), self.meta.arch.clone()),
            (
                "rws.base_fingerprint".to_string(),
                self.meta.base_fingerprint.clone(),
            ),
            ("rws.corruption".to_string(), self.meta.corruption.clone()),
            (
                "rws.default_alpha".to_string(),
                self.meta.default_alpha.to_string(),
            ),
            ("rws.synthetic".to_string(), self.meta.synthetic.to_string()),
        ]);
        let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, d) in &self.deltas {
            match &d.delta {
                Delta::F32(v) => {
                    buffers.push((name.clone(), Dtype::F32, d.shape.clone(), f32_le(v)))
                }
                Delta::F16(v) => buffers.push((
                    name.clone(),
                    Dtype::F16,
                    d.shape.clone(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )),
                Delta::Int8 {
                    q, scale, offset, ..
                }
                | Delta::Int4 {
                    q, scale, offset, ..
                } => {
                    let (suffix, qshape) = if let Delta::Int8 { .. } = d.delta {
                        ("q8", d.shape.clone())
                    } else {
                        let dims = d.shape.iter().map(|x| x.to_string()).collect::<Vec<_>>();
                        md.insert(format!("rws.shape.{name}"), dims.join(","));
                        ("q4", vec![scale.len(), q.len() / scale.len().max(1)])
                    };
                    buffers.push((format!("{name}.{suffix}"), Dtype::U8, qshape, q.clone()));
                    buffers.push((
                        format!("{name}.scale"),
                        Dtype::F32,
                        vec![scale.len()],
                        f32_le(scale),
                    ));
                    buffers.push((
                        format!("{name}.offset"),
                        Dtype::F32,
                        vec![offset.len()],
                        f32_le(offset),
                    ));
                }
            }
        }
        let views = buffers
            .iter()
            .map(|(n, dt, s, b)| Ok((n.as_str(), TensorView::new(*dt, s.clone(), b)?)))
            .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| Error::Internal(format!("cannot serialize signature: {e}")))?;
        safetensors::serialize(views, Some(md))
            .map_err(|e| Error::Internal(format!("cannot serialize signature: {e}")))
            .and_then(crate::tensorfile::canonical)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        crate::fsutil::write_atomic(path, &bytes)
    }

    /// A human-readable listing for `rws inspect`.
    pub fn describe(&self) -> String {
        let m = &self.meta;
        let mut s = String::new();
        let _ = writeln!(s, "format         rws {FORMAT_VERSION}");
        let _ = writeln!(s, "arch           {}", m.arch);
        let _ = writeln!(s, "fingerprint    {}", m.base_fingerprint);
        let _ = writeln!(s, "corruption     {}", m.corruption);
        let _ = writeln!(s, "default alpha  {}", m.default_alpha);
        let _ = writeln!(s, "synthetic      {}", m.synthetic);
        let _ = writeln!(s, "quant          {}", self.quant_summary());
        let _ = writeln!(s, "bytes          {}", self.stored_bytes());
        let _ = writeln!(s, "tensors        {}", self.deltas.len());
        for (name, d) in &self.deltas {
            let _ = writeln!(
                s,
                "  {name:<40} {:<5} {:<18} {:>9} B",
                d.delta.quant().to_string(),
                format!("{:?}", d.shape),
                d.delta.stored_bytes()
            );
        }
        s
    }
}

fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32_le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn sample(quant: Quant) -> Signature {
        let mut rng = Rng::new(5);
        let mut deltas = BTreeMap::new();
        // Odd per-channel count, to exercise int4 padding.
        let w: Vec<f32> = (0..8 * 3 * 3 * 3).map(|_| rng.normal()).collect();
        deltas.insert(
            "conv1.weight".to_string(),
            TensorDelta {
                shape: vec![8, 3, 3, 3],
                delta: Delta::quantize(&w, 8, quant),
            },
        );
        let g: Vec<f32> = (0..8).map(|_| rng.normal()).collect();
        deltas.insert(
            "bn1.weight".to_string(),
            TensorDelta {
                shape: vec![8],
                delta: Delta::F32(g),
            },
        );
        let meta = SignatureMeta {
            arch: "resnet18".into(),
            base_fingerprint: "sha256:ab".into(),
            corruption: "fog".into(),
            default_alpha: 0.75,
            synthetic: false,
        };
        Signature::new(meta, deltas).unwrap()
    }

    #[test]
    fn every_storage_form_round_trips_through_the_file_format() {
        for q in [Quant::F32, Quant::F16, Quant::Int8, Quant::Int4] {
            let sig = sample(q);
            let back = Signature::from_bytes(&sig.to_bytes().unwrap()).unwrap();
            assert_eq!(back, sig, "{q}");
            assert_eq!(back.quant_summary(), q.to_string());
        }
    }

    #[test]
    fn quantized_storage_shrinks_and_stays_close() {
        let exact = sample(Quant::F32);
        let w = exact.deltas()["conv1.weight"].delta.dequantize();
        for (q, max_ratio) in [(Quant::F16, 0.55), (Quant::Int8, 0.4), (Quant::Int4, 0.3)] {
            let small = exact.quantized(q);
            assert!(
                (small.stored_bytes() as f64) < max_ratio * exact.stored_bytes() as f64,
                "{q}"
            );
            // 1-D deltas stay float.
            assert!(matches!(
                small.deltas()["bn1.weight"].delta,
                Delta::F32(_) | Delta::F16(_)
            ));
            let got = small.deltas()["conv1.weight"].delta.dequantize();
            let range = w.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
            let levels = match q {
                Quant::Int4 => 15.0,
                Quant::Int8 => 255.0,
                _ => 1000.0,
            };
            let worst = w
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= range / levels / 2.0 + 1e-6, "{q}: error {worst}");
        }
    }

    #[test]
    fn malformed_files_are_refused_with_reasons() {
        let bytes = sample(Quant::Int8).to_bytes().unwrap();
        let err = Signature::from_bytes(&bytes[..bytes.len() - 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("safetensors"), "{err}");
        let st = safetensors::serialize(
            [(
                "x",
                TensorView::new(Dtype::F32, vec![1], &[0, 0, 0, 0]).unwrap(),
            )],
            None,
        )
        .unwrap();
        let err = Signature::from_bytes(&st).unwrap_err().to_string();
        assert!(err.contains("rws.format"), "{err}");
    }
}
