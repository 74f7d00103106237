//! The fused add-scale on a CUDA device (the `cuda` feature): the same formula as
//! [`super::cpu`] (see [`crate::patch::kernel`]), for every layer of a stem in one launch.
//!
//! The kernel is the CUDA C in `add_scale.cu`, compiled at run time by NVRTC into a
//! cubin for the device's exact architecture, once per device. A cubin rather than
//! PTX: the driver does not JIT it, so an NVRTC newer than the driver (e.g. the one
//! next to PyTorch) still produces loadable code.
//!
//! The clean layer parameters ([`DeviceConvBn`]) and each signature's deltas
//! ([`DeviceDelta`], in their stored int8/int4/f16/f32 form) are uploaded once and
//! stay on the device, so a profile switch moves no weights: it uploads a descriptor
//! table of a few KB, launches one kernel that reads every input once and writes every
//! output once, and reads back one status word.
//!
//! Synchronization: candle's CUDA device issues work on the calling thread's
//! per-thread default stream, and those streams do not order against each other. So
//! every function here synchronizes its stream before it returns data that another
//! thread (a batch worker) may read.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use candle_core::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    SyncOnDrop,
};
use candle_core::cuda_backend::cudarc::nvrtc::{self, Ptx};
use candle_core::cuda_backend::{DeviceId, WrapErr};
use half::f16;

use super::descriptor::{DeltaRecord, LAYER_BYTES, LayerRecord, Table};
use super::{ConvBn, DeltaView, KernelError};
use crate::patch::quant::Quant;
use crate::{Error, Result};

/// The kernel source, shared by the NVRTC build here and scripts/gpu/check_kernel_cupy.py.
pub const SOURCE: &str = include_str!("add_scale.cu");
const ENTRY: &str = "rws_fused_add_scale";
/// Threads per block, i.e. per output channel: enough bytes in flight per SM for the
/// large layers, and tiny stem rows waste only idle threads.
const BLOCK: u32 = 256;
/// Both outputs of every layer start on a 256-byte boundary (cuBLAS's preferred alignment).
const ALIGN: usize = 64;

/// NVRTC options that make the kernel's arithmetic the CPU kernel's: no FMA
/// contraction, IEEE division and square root, no flush of subnormals.
const NVRTC_MATH: [&str; 4] = [
    "--fmad=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--ftz=false",
];

/// Compiled kernels, one per device (compiling takes a noticeable fraction of a second).
static FUNCTIONS: LazyLock<Mutex<HashMap<DeviceId, CudaFunction>>> =
    LazyLock::new(Default::default);

fn function(dev: &CudaDevice) -> Result<CudaFunction> {
    let mut cache = FUNCTIONS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = cache.get(&dev.id()) {
        return Ok(f.clone());
    }
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let (major, minor) = ctx.compute_capability().w()?;
    let cubin = compile(&format!("sm_{major}{minor}"))?;
    let module = ctx.load_module(Ptx::from_binary(cubin)).w()?;
    let f = module.load_function(ENTRY).w()?;
    cache.insert(dev.id(), f.clone());
    Ok(f)
}

/// `add_scale.cu` compiled by NVRTC for `arch` (e.g. `sm_90`).
fn compile(arch: &str) -> Result<Vec<u8>> {
    use nvrtc::{result, sys};
    let src = CString::new(SOURCE).expect("the kernel source holds no NUL byte");
    let prog = result::create_program(&src, Some(c"add_scale.cu"))
        .map_err(|e| Error::Internal(format!("NVRTC cannot create a program: {e}")))?;
    let arch_opt = format!("--gpu-architecture={arch}");
    let mut opts = vec![arch_opt.as_str()];
    opts.extend(NVRTC_MATH);
    // SAFETY: `prog` was just created and is destroyed only below, after its last use.
    let cubin = unsafe {
        match result::compile_program(prog, &opts) {
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(Error::Internal(format!(
                    "NVRTC cannot compile src/patch/kernel/add_scale.cu for {arch} ({e}): {log}; \
                     the NVRTC library on LD_LIBRARY_PATH may be too old for this GPU"
                )))
            }
            Ok(()) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut cubin = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                            .result()
                            .map(|()| cubin)
                    })
                    .map_err(|e| Error::Internal(format!("NVRTC gave no cubin for {arch}: {e}")))
            }
        }
    };
    // SAFETY: created above and not destroyed before.
    unsafe { result::destroy_program(prog) }
        .map_err(|e| Error::Internal(format!("NVRTC cannot free a program: {e}")))?;
    cubin
}

/// The clean weights of one conv layer and its BatchNorm ([`ConvBn`]), on the device.
#[derive(Debug)]
pub struct DeviceConvBn {
    weight: CudaSlice<f32>,
    gamma: CudaSlice<f32>,
    beta: CudaSlice<f32>,
    mean: CudaSlice<f32>,
    var: CudaSlice<f32>,
    out_channels: usize,
    cols: usize,
    eps: f32,
}

impl DeviceConvBn {
    pub fn upload(base: &ConvBn, dev: &CudaDevice) -> Result<Self> {
        let stream = dev.cuda_stream();
        let up = |v: &[f32]| stream.clone_htod(v).w();
        let layer = DeviceConvBn {
            weight: up(base.weight)?,
            gamma: up(base.gamma)?,
            beta: up(base.beta)?,
            mean: up(base.mean)?,
            var: up(base.var)?,
            out_channels: base.out_channels,
            cols: base.per_channel(),
            eps: base.eps,
        };
        stream.synchronize().w()?;
        Ok(layer)
    }
}

/// One stored delta on the device, in its stored form: the kernel dequantizes on the fly.
#[derive(Debug)]
pub enum DeviceDelta {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    /// [`Quant::Int8`] or [`Quant::Int4`], with the per-row affine.
    Int {
        quant: Quant,
        cols: usize,
        rows: usize,
        q: CudaSlice<u8>,
        scale: CudaSlice<f32>,
        offset: CudaSlice<f32>,
    },
}

impl DeviceDelta {
    /// Copies `view` to the device. Asynchronous: synchronize `stream` before another
    /// thread reads it.
    pub fn upload(view: DeltaView, stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(match view {
            DeltaView::F32(v) => DeviceDelta::F32(stream.clone_htod(v).w()?),
            DeltaView::F16(v) => DeviceDelta::F16(stream.clone_htod(v).w()?),
            DeltaView::Int8 {
                cols,
                q,
                scale,
                offset,
            }
            | DeltaView::Int4 {
                cols,
                q,
                scale,
                offset,
            } => DeviceDelta::Int {
                quant: view.quant(),
                cols,
                rows: scale.len(),
                q: stream.clone_htod(q).w()?,
                scale: stream.clone_htod(scale).w()?,
                offset: stream.clone_htod(offset).w()?,
            },
        })
    }

    /// Logical element count, as [`DeltaView::len`].
    pub fn len(&self) -> usize {
        match self {
            DeviceDelta::F32(v) => v.len(),
            DeviceDelta::F16(v) => v.len(),
            DeviceDelta::Int { cols, rows, .. } => cols * rows,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A signature's deltas on one device, by base tensor name.
pub type DeviceDeltas = HashMap<String, DeviceDelta>;

/// Uploads every delta of a signature to `dev`, waiting until the copies are done.
pub fn upload_deltas<'a>(
    dev: &CudaDevice,
    deltas: impl IntoIterator<Item = (&'a str, DeltaView<'a>)>,
) -> Result<DeviceDeltas> {
    let stream = dev.cuda_stream();
    let uploaded = deltas
        .into_iter()
        .map(|(name, view)| Ok((name.to_string(), DeviceDelta::upload(view, &stream)?)))
        .collect::<Result<DeviceDeltas>>()?;
    stream.synchronize().w()?;
    Ok(uploaded)
}

/// One signature's contribution to one layer, on the device ([`super::LayerDelta`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceLayerDelta<'a> {
    pub alpha: f32,
    pub weight: Option<&'a DeviceDelta>,
    pub gamma: Option<&'a DeviceDelta>,
    pub beta: Option<&'a DeviceDelta>,
    pub mean: Option<&'a DeviceDelta>,
    pub var: Option<&'a DeviceDelta>,
}

/// One layer of a launch: its clean parameters and the signatures to add, in order.
#[derive(Debug)]
pub struct LayerJob<'a> {
    pub base: &'a DeviceConvBn,
    pub deltas: Vec<DeviceLayerDelta<'a>>,
}

/// Where each layer's folded weight `[O, cols]` and bias `[O]` go in one flat f32
/// buffer: one allocation per stem instead of two per layer.
#[derive(Debug, Clone)]
pub struct OutputLayout {
    offsets: Vec<(usize, usize)>,
    len: usize,
}

impl OutputLayout {
    /// From each layer's `(out_channels, cols)`.
    pub fn new(shapes: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut len = 0;
        let mut take = |n: usize| {
            let at = len;
            len += n.next_multiple_of(ALIGN);
            at
        };
        let offsets = shapes
            .into_iter()
            .map(|(o, cols)| (take(o * cols), take(o)))
            .collect();
        OutputLayout { offsets, len }
    }

    /// Element offsets of layer `i`'s folded weight and bias.
    pub fn offsets(&self, i: usize) -> (usize, usize) {
        self.offsets[i]
    }

    /// Elements of the whole buffer, alignment padding included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why [`fused_add_scale`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// The patch cannot be folded: the CPU kernel's error, at the lowest failing layer
    /// (index into the jobs) and, within it, the lowest failing channel.
    #[error("layer {layer}: {error}")]
    Patch { layer: usize, error: KernelError },
    #[error(transparent)]
    Device(#[from] Error),
}

impl From<candle_core::Error> for FoldError {
    fn from(e: candle_core::Error) -> Self {
        FoldError::Device(e.into())
    }
}

/// What the kernel leaves in the status word when every channel folded.
const STATUS_OK: u64 = u64::MAX;
/// Field widths of the status word (see `report` in add_scale.cu).
const MAX_LAYERS: usize = 1 << 10;
const MAX_CHANNELS: usize = 1 << 21;

/// Folds every layer of `layers` into `out` (laid out by `layout`, built from the same
/// layers in the same order) in one kernel launch, and waits for it. On error `out`
/// holds partial results and must not be served, as with [`super::cpu::fused_add_scale`].
pub fn fused_add_scale(
    dev: &CudaDevice,
    layers: &[LayerJob],
    layout: &OutputLayout,
    out: &mut CudaSlice<f32>,
) -> Result<(), FoldError> {
    run(dev, layers, layout, out, false).map(drop)
}

/// [`fused_add_scale`], also returning the kernel's own execution time (CUDA events
/// around the launch alone, without the descriptor upload and status read), for
/// comparing it with a device-to-device copy.
pub fn fused_add_scale_timed(
    dev: &CudaDevice,
    layers: &[LayerJob],
    layout: &OutputLayout,
    out: &mut CudaSlice<f32>,
) -> Result<Duration, FoldError> {
    run(dev, layers, layout, out, true).map(Option::unwrap_or_default)
}

fn run(
    dev: &CudaDevice,
    layers: &[LayerJob],
    layout: &OutputLayout,
    out: &mut CudaSlice<f32>,
    timed: bool,
) -> Result<Option<Duration>, FoldError> {
    check(layers, layout, out.len())?;
    let rows: usize = layers.iter().map(|l| l.base.out_channels).sum();
    if rows == 0 {
        return Ok(None);
    }
    let func = function(dev)?;
    let stream = dev.cuda_stream();
    // Device pointers of every input; each guard must outlive the launch (they record
    // the reads for cudarc's cross-stream tracking, a no-op on candle's streams).
    let mut guards: Vec<SyncOnDrop> = Vec::new();
    let mut table = Table::new(STATUS_OK);
    let mut first_block = 0u32;
    let mut first_sig = 0u32;
    for (i, job) in layers.iter().enumerate() {
        let b = job.base;
        let [weight, gamma, beta, mean, var] =
            [&b.weight, &b.gamma, &b.beta, &b.mean, &b.var].map(|p| {
                let (ptr, g) = p.device_ptr(&stream);
                guards.push(g);
                ptr
            });
        let (w_at, b_at) = layout.offsets(i);
        table.layer(&LayerRecord {
            weight,
            gamma,
            beta,
            mean,
            var,
            out_w: w_at as u64,
            out_b: b_at as u64,
            out_channels: b.out_channels as u32,
            cols: b.cols as u32,
            first_block,
            first_sig,
            n_sigs: job.deltas.len() as u32,
            eps: b.eps,
        });
        first_block += b.out_channels as u32;
        first_sig += job.deltas.len() as u32;
    }
    for job in layers {
        for d in &job.deltas {
            let parts = [d.weight, d.gamma, d.beta, d.mean, d.var]
                .map(|part| delta_record(part, &stream, &mut guards));
            table.signature(parts, d.alpha);
        }
    }
    let mut desc = stream.clone_htod(table.bytes()).w()?;
    let events = {
        let (desc_ptr, g_desc) = desc.device_ptr_mut(&stream);
        let (out_ptr, g_out) = out.device_ptr_mut(&stream);
        let layers_ptr = desc_ptr + 8;
        let sigs_ptr = layers_ptr + (LAYER_BYTES * layers.len()) as u64;
        let n_layers = layers.len() as u32;
        let cfg = LaunchConfig {
            grid_dim: (first_block, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&layers_ptr)
            .arg(&n_layers)
            .arg(&sigs_ptr)
            .arg(&out_ptr)
            .arg(&desc_ptr);
        if timed {
            launch.record_kernel_launch(CUevent_flags::CU_EVENT_DEFAULT);
        }
        // SAFETY: the arguments match the kernel's signature; every pointer in the
        // table and the arguments is a live allocation that `check` sized for the
        // layout, and the guards keep them borrowed until after the launch.
        let events = unsafe { launch.launch(cfg) }.w()?;
        drop((g_desc, g_out));
        events
    };
    drop(guards);
    let mut status = [0u8; 8];
    stream.memcpy_dtoh(&desc.slice(0..8), &mut status).w()?;
    stream.synchronize().w()?;
    decode(u64::from_le_bytes(status))?;
    let elapsed = events
        .map(|(start, end)| start.elapsed_ms(&end))
        .transpose()
        .w()?;
    Ok(elapsed.map(|ms| Duration::from_secs_f64(f64::from(ms) / 1e3)))
}

/// Validates what the kernel trusts: sizes (an out-of-bounds read on the device would
/// be silent) and the status word's field widths.
fn check(layers: &[LayerJob], layout: &OutputLayout, out_len: usize) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if layers.len() >= MAX_LAYERS {
        return bad(format!(
            "{} layers in one launch; at most {}",
            layers.len(),
            MAX_LAYERS - 1
        ));
    }
    if layout.offsets.len() != layers.len() || out_len < layout.len {
        return bad("the output layout does not match the layers".into());
    }
    let mut rows = 0usize;
    for (i, job) in layers.iter().enumerate() {
        let (o, cols) = (job.base.out_channels, job.base.cols);
        rows += o;
        if o >= MAX_CHANNELS || cols > u32::MAX as usize || rows > u32::MAX as usize {
            return bad(format!(
                "layer {i} ({o}x{cols}) is too large for the kernel"
            ));
        }
        if layout.offsets[i].0 + o * cols > out_len || layout.offsets[i].1 + o > out_len {
            return bad(format!("layer {i} does not fit the output layout"));
        }
        for d in &job.deltas {
            if let Some(w) = d.weight {
                if w.len() != o * cols {
                    return bad(format!(
                        "layer {i}: weight delta has {} elements, expected {o}x{cols}",
                        w.len()
                    ));
                }
                if let DeviceDelta::Int { cols: c, .. } = w
                    && *c != cols
                {
                    return bad(format!(
                        "layer {i}: int weight delta rows have {c} elements, expected {cols}"
                    ));
                }
            }
            for p in [d.gamma, d.beta, d.mean, d.var].into_iter().flatten() {
                if p.len() != o {
                    return bad(format!(
                        "layer {i}: BatchNorm delta has {} elements, expected {o}",
                        p.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The kernel's status word as a result (layout: `report` in add_scale.cu).
fn decode(status: u64) -> Result<(), FoldError> {
    if status == STATUS_OK {
        return Ok(());
    }
    let layer = (status >> 54) as usize;
    let channel = ((status >> 33) as usize) & (MAX_CHANNELS - 1);
    let error = if (status >> 32) & 1 == 0 {
        KernelError::NegativeVariance {
            channel,
            var: f32::from_bits(status as u32),
        }
    } else {
        KernelError::NotFinite { channel }
    };
    Err(FoldError::Patch { layer, error })
}

/// One `Delta` of the table, its buffers' device addresses borrowed (with
/// their guards) from `stream`; all zero when absent.
fn delta_record<'a>(
    d: Option<&'a DeviceDelta>,
    stream: &'a CudaStream,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> DeltaRecord {
    let mut ptr = |s: (u64, SyncOnDrop<'a>)| {
        guards.push(s.1);
        s.0
    };
    match d {
        None => DeltaRecord::default(),
        Some(DeviceDelta::F32(v)) => DeltaRecord {
            data: ptr(v.device_ptr(stream)),
            ..Default::default()
        },
        Some(DeviceDelta::F16(v)) => DeltaRecord {
            data: ptr(v.device_ptr(stream)),
            kind: 1,
            ..Default::default()
        },
        Some(DeviceDelta::Int {
            quant,
            cols,
            q,
            scale,
            offset,
            ..
        }) => DeltaRecord {
            data: ptr(q.device_ptr(stream)),
            scale: ptr(scale.device_ptr(stream)),
            offset: ptr(offset.device_ptr(stream)),
            kind: if *quant == Quant::Int8 { 2 } else { 3 },
            cols: *cols as u32,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_every_part() {
        let l = OutputLayout::new([(64, 147), (64, 576), (3, 1)]);
        assert_eq!(l.offsets(0), (0, 9408));
        assert_eq!(l.offsets(1), (9408 + 64, 9408 + 64 + 36864));
        let (w, b) = l.offsets(2);
        assert!(w % ALIGN == 0 && b % ALIGN == 0 && b >= w + 3);
        assert_eq!(l.len(), b + ALIGN);
    }

    #[test]
    fn status_word_decodes_like_the_kernel_encodes() {
        assert!(decode(STATUS_OK).is_ok());
        let key = |layer: u64, channel: u64, kind: u64, var: f32| {
            layer << 54 | channel << 33 | kind << 32 | var.to_bits() as u64
        };
        match decode(key(3, 1234, 0, -0.5)) {
            Err(FoldError::Patch { layer, error }) => {
                assert_eq!(layer, 3);
                assert_eq!(
                    error,
                    KernelError::NegativeVariance {
                        channel: 1234,
                        var: -0.5
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        match decode(key(1023, (MAX_CHANNELS - 1) as u64, 1, 0.0)) {
            Err(FoldError::Patch { layer, error }) => {
                assert_eq!(layer, 1023);
                assert_eq!(
                    error,
                    KernelError::NotFinite {
                        channel: MAX_CHANNELS - 1
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        // The lowest layer wins over any channel of a later one, then the lowest channel.
        assert!(key(0, (MAX_CHANNELS - 1) as u64, 1, 0.0) < key(1, 0, 0, 0.0));
        assert!(key(2, 5, 1, 0.0) < key(2, 6, 0, -1.0));
    }
}
