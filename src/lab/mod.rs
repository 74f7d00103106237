//! The research pipeline that makes signatures, apart from the server: corruptions
//! ([`corrupt`]), MNIST ([`data`]), training ([`train`]), the corruption detector ([`detector`]), signature extraction
//! ([`extract`]), evaluation over
//! training seeds and plots ([`eval`], [`stats`], [`plot`]), and synthetic models for
//! tests and benchmarks ([`synth`]). It uses the model and patching code; the
//! serving core never uses it.

pub mod corrupt;
pub mod data;
pub mod detector;
pub mod eval;
pub mod extract;
pub mod plot;
pub mod stats;
pub mod synth;
pub mod train;
