//! rws: an inference server for image classifiers that patches robustness in at
//! runtime with Robust Weight Signatures (Cai, Zhang, Wang, ICML 2023).
//!
//! The library holds everything; the `rws` binary and the gRPC layer in
//! [`server`] are thin wrappers over [`engine::Engine`].

pub mod batch;
pub mod bench;
pub mod corrupt;
pub mod data;
pub mod device;
pub mod engine;
pub mod error;
pub mod eval;
pub mod extract;
pub mod fleet;
pub mod fsutil;
pub mod kernel;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod preprocess;
pub mod profile;
pub mod quant;
pub mod repo;
pub mod rng;
pub mod server;
pub mod signature;
pub mod state;
pub mod synth;
pub mod train;

pub use error::{Error, Result};
