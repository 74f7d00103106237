//! Patching: what a Robust Weight Signature is and how it becomes weights.
//!
//! [`signature`] is the file format (tensors of deltas plus metadata), [`quant`] the
//! storage of one delta tensor (f32, f16, int8, int4), and [`kernel`] the fused
//! add-scale that turns clean weights and deltas into served weights, on the CPU or
//! as a CUDA kernel. It knows tensors and shapes, not models or requests.

pub mod kernel;
pub mod quant;
pub mod signature;
