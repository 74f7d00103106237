//! The research pipeline that makes signatures, apart from the server: corruptions
//! ([`corrupt`]), MNIST ([`data`]), training ([`train`], with the convolutions
//! of [`conv`]), signatures from unlabelled photos ([`distill`]), the corruption
//! detector ([`detector`]), signature extraction ([`extract`]), evaluation
//! ([`eval`]), the report over training seeds and its plots ([`report`],
//! [`stats`], [`plot`]), and synthetic models for tests and benchmarks
//! ([`synth`]). It uses the model and patching code; the serving core never
//! uses it.

pub mod conv;
pub mod corrupt;
pub mod data;
pub mod detector;
pub mod distill;
pub mod eval;
pub mod extract;
pub mod plot;
pub mod report;
pub mod stats;
pub mod synth;
pub mod train;
