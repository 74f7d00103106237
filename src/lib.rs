//! rws: an inference server for image classifiers that patches robustness in at
//! runtime with Robust Weight Signatures (Cai, Zhang, Wang, ICML 2023).
//!
//! The house, with imports pointing down only (`tests/layout.rs` checks it):
//!
//! - [`server`]: the wire protocols (rws.v1, KServe v2, health, reflection) and the
//!   client calls; the only module that knows them.
//! - [`bench`]: the measurements behind `rws bench`.
//! - [`serve`]: the serving core: engine, batching, profile table, state, fleet.
//! - [`lab`]: the research pipeline that makes signatures; never used by `serve`.
//! - [`model`]: architectures, the stem/trunk split, BatchNorm folding, conv ops,
//!   model directories and devices.
//! - [`patch`]: the signature format, quantized storage and the add-scale kernels.
//! - [`error`], [`fsutil`], [`rng`], [`tensorfile`]: small helpers everything may use.

pub mod bench;
pub mod error;
pub mod fsutil;
pub mod lab;
pub mod model;
pub mod patch;
pub mod rng;
pub mod serve;
pub mod server;
pub mod tensorfile;

pub use error::{Error, Result};
