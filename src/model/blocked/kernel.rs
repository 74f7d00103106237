//! The direct-convolution microkernel: a tile of up to
//! [`Isa::tile_pixels`] output pixels by `OB` blocks of [`LANES`] output channels, accumulated in registers
//! over every input channel and kernel tap, then the epilogue (bias, residual,
//! activation) applied before the one store. AVX-512 or AVX2 with FMA where the
//! CPU has them (checked once), a portable loop otherwise ([`Isa`]).
//!
//! Every output value is one fixed sequence of multiply-adds over its inputs,
//! whichever tile, thread or batch it falls in: an image's output does not
//! depend on what else is computed with it.

use std::marker::PhantomData;
use std::sync::OnceLock;

pub use crate::model::arch::Act;

/// Output channels per block: one AVX2 register of f32.
pub const LANES: usize = 8;

/// Output blocks per group of packed weights: one AVX-512 register of them.
/// A tile of more blocks reads several groups' runs in step, `group_stride`
/// apart ([`Tile`]).
pub const GROUP: usize = 2;

/// How the K loop walks the input: `blocks` groups of `CI` channels (`CI` = 8
/// for a blocked input, 1 for a planar one), each group `block_stride` floats
/// apart, channels inside a group adjacent; `kh × kw` taps, rows `row_stride`
/// and pixels `pixel_stride` floats apart.
#[derive(Debug, Clone, Copy)]
pub struct Walk {
    pub blocks: usize,
    pub block_stride: usize,
    pub kh: usize,
    pub kw: usize,
    pub row_stride: usize,
    pub pixel_stride: usize,
}

/// One tile's operands. Offsets are in floats. The tile's pixels are `S`
/// input pixels apart (`S · CI` floats: the conv's stride, in one row or in a
/// row-major run over a bordered plane) and adjacent in the output: pixel `p`'s
/// window starts at `x_at + p · S · CI` in `x`, its output vector at
/// `out_at + p · LANES` in each of the `OB` output blocks (`out_stride` apart,
/// likewise in `residual`). With one base and constant steps, the kernel
/// addresses every pixel off one register: a pointer per pixel spilled out of
/// the 16 general registers and cost 6 reloads per step at 16 pixels.
///
/// A tile of more than [`GROUP`] blocks covers `OB / GROUP` consecutive groups
/// of packed weights, each's run `group_stride` floats after the previous: one
/// broadcast input value then feeds `OB / GROUP` registers of weights, which
/// halves the loads per multiply-add on 1×1 convs, whose K loop is short.
///
/// A conv whose weights outgrow L1 runs its K loop in chunks: the first
/// starts from bias (and residual), each later one (`accumulate`) from the
/// partial sums the previous chunk stored, and only the last applies `act`.
/// Storing and reloading an f32 is exact, so the chunking leaves every output
/// bit for bit as one pass would.
pub struct Tile<'a> {
    pub x: &'a [f32],
    pub x_at: usize,
    pub weights: &'a [f32],
    pub group_stride: usize,
    pub bias: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub out_at: usize,
    pub out_stride: usize,
    pub accumulate: bool,
    pub act: Act,
}

/// Where tiles write: output planes that the tiles of several threads may fill
/// at once, each thread its own rows. A raw view, because one thread's rows
/// interleave with another's from plane to plane, which no set of disjoint
/// `&mut` slices can hold.
pub struct Out<'a> {
    ptr: *mut f32,
    len: usize,
    _data: PhantomData<&'a mut [f32]>,
}

// SAFETY: an `Out` is a `&mut [f32]`; the copies `share` makes carry the
// contract that no two threads touch the same element through them.
unsafe impl Send for Out<'_> {}
unsafe impl Sync for Out<'_> {}

impl<'a> Out<'a> {
    pub fn new(data: &'a mut [f32]) -> Out<'a> {
        Out {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            _data: PhantomData,
        }
    }

    /// A second view of the same floats, for another thread.
    ///
    /// # Safety
    /// While both are in use, no float is written through one and read or
    /// written through the other.
    pub unsafe fn share(&self) -> Out<'a> {
        Out { ..*self }
    }

    /// The `len` floats from `start`.
    pub fn part(&mut self, start: usize, len: usize) -> Out<'_> {
        assert!(start + len <= self.len, "a part past the output's end");
        Out {
            // SAFETY: in bounds (asserted).
            ptr: unsafe { self.ptr.add(start) },
            len,
            _data: PhantomData,
        }
    }

    pub fn floats(&self) -> usize {
        self.len
    }

    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.ptr
    }

    fn read(&self, at: usize) -> [f32; LANES] {
        assert!(at + LANES <= self.len, "a read past the output's end");
        // SAFETY: in bounds (asserted), and no other thread's (`share`).
        unsafe { self.ptr.add(at).cast::<[f32; LANES]>().read_unaligned() }
    }

    fn write(&mut self, at: usize, v: [f32; LANES]) {
        assert!(at + LANES <= self.len, "a write past the output's end");
        // SAFETY: as for `read`.
        unsafe { self.ptr.add(at).cast::<[f32; LANES]>().write_unaligned(v) }
    }

    /// Zeroes `len` floats from `at`.
    pub fn zero(&mut self, at: usize, len: usize) {
        assert!(at + len <= self.len, "a write past the output's end");
        // SAFETY: as for `read`.
        unsafe { std::ptr::write_bytes(self.ptr.add(at), 0, len) }
    }
}

/// Runs one tile of `PX` pixels, `S` input pixels apart, into `out` with the
/// kernels of `isa`, which this CPU must have.
///
/// `weights` holds, per group of up to [`GROUP`] blocks (`group_stride`
/// apart), `walk.blocks · kh · kw · CI` runs of one value per output channel
/// of the group, in K-loop order; `bias` holds `OB · LANES`.
pub fn run<const OB: usize, const PX: usize, const CI: usize, const S: usize>(
    isa: Isa,
    walk: &Walk,
    t: &Tile<'_>,
    out: &mut Out<'_>,
) {
    check::<OB, PX, CI, S>(walk, t, out.floats());
    assert!(isa.supported(), "this CPU cannot run the {isa} kernels");
    match isa {
        // SAFETY (both): the CPU has the features (asserted above), and `check`
        // bounds every offset the kernels read or write.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::<OB, PX, CI, S>(walk, t, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::avx2::<OB, PX, CI, S>(walk, t, out) },
        _ => portable::<OB, PX, CI, S>(walk, t, out),
    }
}

/// An instruction set the CPU kernels can run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, for any CPU.
    Portable,
    /// AVX2 and FMA: 8 lanes, 16 registers.
    Avx2,
    /// AVX-512 (F and VL): 16 lanes, 32 registers. The blocked layout keeps
    /// 8 channels per block; one register holds a pixel of two blocks.
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU has the instructions (detected once).
    pub fn supported(self) -> bool {
        static HAS: OnceLock<[bool; 3]> = OnceLock::new();
        HAS.get_or_init(|| Isa::ALL.map(Isa::detect))[self as usize]
    }

    fn detect(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Portable => true,
                Isa::Avx2 => has!("avx2") && has!("fma"),
                Isa::Avx512 => Isa::Avx2.detect() && has!("avx512f") && has!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// The best this CPU has.
    pub fn best() -> Isa {
        *Isa::ALL
            .iter()
            .rev()
            .find(|i| i.supported())
            .expect("portable")
    }

    /// Output pixels per tile: as many accumulators as the registers hold
    /// beside the weights and a broadcast (AVX-512: 16 of 32 registers for
    /// two blocks, one each; AVX2: 5 × 2 of 16).
    pub const fn tile_pixels(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            _ => 5,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Isa> {
        match Isa::ALL.iter().find(|i| i.name() == s) {
            Some(i) => Ok(*i),
            None => crate::bail!(
                InvalidArgument,
                "no CPU kernels named {:?}; choose avx512, avx2 or portable",
                s.chars().take(32).collect::<String>()
            ),
        }
    }
}

static CHOSEN: OnceLock<Isa> = OnceLock::new();

/// The instruction set the CPU kernels run with: the one [`choose`] set, else
/// the best this CPU has. Logged at start-up and shown in
/// `rws_cpu_kernel_info{isa}`.
pub fn isa() -> Isa {
    *CHOSEN.get_or_init(Isa::best)
}

/// Runs the CPU kernels with `isa` (`rws --cpu-isa`, to compare kernels on one
/// machine), before any has run. Refuses an ISA this CPU lacks, or a second
/// choice once the kernels have started.
pub fn choose(isa: Isa) -> crate::Result<()> {
    if !isa.supported() {
        crate::bail!(
            InvalidArgument,
            "this CPU has no {isa}; it can run {}",
            Isa::ALL
                .iter()
                .filter(|i| i.supported())
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match CHOSEN.get_or_init(|| isa) {
        chosen if *chosen == isa => Ok(()),
        chosen => crate::bail!(
            FailedPrecondition,
            "the CPU kernels already run with {chosen}"
        ),
    }
}

/// Panics unless every access of the tile is in bounds: the kernels index
/// unchecked.
fn check<const OB: usize, const PX: usize, const CI: usize, const S: usize>(
    w: &Walk,
    t: &Tile<'_>,
    out: usize,
) {
    let taps = w.blocks * w.kh * w.kw * CI;
    let width = OB.min(GROUP);
    assert!(
        OB == width || OB.is_multiple_of(GROUP),
        "a tile of whole groups"
    );
    let groups = OB / width;
    assert!(
        groups == 1 || t.group_stride >= taps * width * LANES,
        "groups overlap"
    );
    assert_eq!(
        t.weights.len(),
        (groups - 1) * t.group_stride + taps * width * LANES,
        "packed weights"
    );
    assert_eq!(t.bias.len(), OB * LANES, "bias");
    assert!(PX > 0, "an empty tile");
    let reach = (w.blocks - 1) * w.block_stride
        + (w.kh - 1) * w.row_stride
        + (w.kw - 1) * w.pixel_stride
        + CI;
    assert!(
        t.x_at + (PX - 1) * S * CI + reach <= t.x.len(),
        "input window"
    );
    let end = t.out_at + (PX - 1) * LANES + (OB - 1) * t.out_stride + LANES;
    assert!(end <= out, "output");
    if let Some(r) = t.residual {
        assert!(end <= r.len(), "residual");
    }
}

fn portable<const OB: usize, const PX: usize, const CI: usize, const S: usize>(
    w: &Walk,
    t: &Tile<'_>,
    out: &mut Out<'_>,
) {
    let mut acc = [[[0f32; LANES]; PX]; OB];
    for (o, acc) in acc.iter_mut().enumerate() {
        for (p, a) in acc.iter_mut().enumerate() {
            if t.accumulate {
                *a = out.read(t.out_at + p * LANES + o * t.out_stride);
                continue;
            }
            a.copy_from_slice(&t.bias[o * LANES..][..LANES]);
            if let Some(r) = t.residual {
                let r = &r[t.out_at + p * LANES + o * t.out_stride..][..LANES];
                a.iter_mut().zip(r).for_each(|(a, r)| *a += r);
            }
        }
    }
    let width = OB.min(GROUP);
    let mut step = 0;
    for b in 0..w.blocks {
        for ky in 0..w.kh {
            for kx in 0..w.kw {
                let at = b * w.block_stride + ky * w.row_stride + kx * w.pixel_stride;
                for i in 0..CI {
                    for p in 0..PX {
                        let x = t.x[t.x_at + p * S * CI + at + i];
                        for (o, acc) in acc.iter_mut().enumerate() {
                            let run = (o / width) * t.group_stride + step * width * LANES;
                            let wv = &t.weights[run + (o % width) * LANES..][..LANES];
                            for l in 0..LANES {
                                acc[p][l] += wv[l] * x;
                            }
                        }
                    }
                    step += 1;
                }
            }
        }
    }
    for (o, acc) in acc.iter().enumerate() {
        for (p, a) in acc.iter().enumerate() {
            out.write(
                t.out_at + p * LANES + o * t.out_stride,
                a.map(|v| t.act.apply(v)),
            );
        }
    }
}

/// The SIMD kernels: one tile body ([`x86::tile`]) over a register type that
/// holds one pixel's `OB` output blocks, instantiated per instruction set.
/// Each lane is one fused multiply-add after another in K-loop order, so every
/// instruction set gives the same bits.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::{Act, LANES, Out, Tile, Walk};

    /// What the tile body needs of a register of `OB · LANES` lanes: a pixel's
    /// `OB` output blocks, contiguous in the packed weights and the bias, and
    /// `stride` apart in the activations.
    ///
    /// Every method is inlined into a caller compiled for its instructions.
    pub(in crate::model::blocked) trait Lanes: Copy {
        const OB: usize;
        /// Floats per K step in one group's run of packed weights.
        const STEP: usize = Self::OB * LANES;
        unsafe fn load(p: *const f32) -> Self;
        /// One K step's weights: a group's run at `p`, the next (if this
        /// holds several) `group_stride` on.
        #[inline(always)]
        unsafe fn load_weights(p: *const f32, _group_stride: usize) -> Self {
            unsafe { Self::load(p) }
        }
        unsafe fn load_blocks(p: *const f32, stride: usize) -> Self;
        unsafe fn store_blocks(self, p: *mut f32, stride: usize);
        unsafe fn splat(p: *const f32) -> Self;
        /// `w · x + acc`, rounded once.
        unsafe fn fma(w: Self, x: Self, acc: Self) -> Self;
        unsafe fn add(self, o: Self) -> Self;
        unsafe fn act(self, act: Act) -> Self;
    }

    /// One output block in one AVX register.
    impl Lanes for __m256 {
        const OB: usize = 1;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_blocks(p: *const f32, _: usize) -> Self {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store_blocks(self, p: *mut f32, _: usize) {
            unsafe { _mm256_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> Self {
            unsafe { _mm256_broadcast_ss(&*p) }
        }
        #[inline(always)]
        unsafe fn fma(w: Self, x: Self, acc: Self) -> Self {
            unsafe { _mm256_fmadd_ps(w, x, acc) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { _mm256_add_ps(self, o) }
        }
        #[inline(always)]
        unsafe fn act(self, act: Act) -> Self {
            // With NaN in either operand max_ps and min_ps return the second:
            // NaN stays NaN, as in `Act::apply`.
            unsafe {
                let zero = _mm256_setzero_ps();
                match act {
                    Act::None => self,
                    Act::Relu => _mm256_max_ps(zero, self),
                    Act::Relu6 => _mm256_min_ps(_mm256_set1_ps(6.0), _mm256_max_ps(zero, self)),
                }
            }
        }
    }

    /// Two output blocks in two AVX registers.
    #[derive(Clone, Copy)]
    pub(super) struct Pair([__m256; 2]);

    impl Lanes for Pair {
        const OB: usize = 2;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Pair([_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(LANES))]) }
        }
        #[inline(always)]
        unsafe fn load_blocks(p: *const f32, stride: usize) -> Self {
            unsafe { Pair([_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(stride))]) }
        }
        #[inline(always)]
        unsafe fn store_blocks(self, p: *mut f32, stride: usize) {
            unsafe {
                _mm256_storeu_ps(p, self.0[0]);
                _mm256_storeu_ps(p.add(stride), self.0[1]);
            }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> Self {
            unsafe {
                let v = _mm256_broadcast_ss(&*p);
                Pair([v, v])
            }
        }
        #[inline(always)]
        unsafe fn fma(w: Self, x: Self, acc: Self) -> Self {
            unsafe {
                let fma = <__m256 as Lanes>::fma;
                Pair([fma(w.0[0], x.0[0], acc.0[0]), fma(w.0[1], x.0[1], acc.0[1])])
            }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { Pair([self.0[0].add(o.0[0]), self.0[1].add(o.0[1])]) }
        }
        #[inline(always)]
        unsafe fn act(self, act: Act) -> Self {
            unsafe { Pair([self.0[0].act(act), self.0[1].act(act)]) }
        }
    }

    /// Two output blocks in one AVX-512 register, the first in the low half.
    impl Lanes for __m512 {
        const OB: usize = 2;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_blocks(p: *const f32, stride: usize) -> Self {
            unsafe {
                let lo = _mm512_castps256_ps512(_mm256_loadu_ps(p));
                let hi = _mm256_castps_pd(_mm256_loadu_ps(p.add(stride)));
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(lo), hi))
            }
        }
        #[inline(always)]
        unsafe fn store_blocks(self, p: *mut f32, stride: usize) {
            unsafe {
                _mm256_storeu_ps(p, _mm512_castps512_ps256(self));
                let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self));
                _mm256_storeu_ps(p.add(stride), _mm256_castpd_ps(hi));
            }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> Self {
            unsafe { _mm512_set1_ps(*p) }
        }
        #[inline(always)]
        unsafe fn fma(w: Self, x: Self, acc: Self) -> Self {
            unsafe { _mm512_fmadd_ps(w, x, acc) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { _mm512_add_ps(self, o) }
        }
        #[inline(always)]
        unsafe fn act(self, act: Act) -> Self {
            // As for AVX2: NaN in the second operand comes out.
            unsafe {
                let zero = _mm512_setzero_ps();
                match act {
                    Act::None => self,
                    Act::Relu => _mm512_max_ps(zero, self),
                    Act::Relu6 => _mm512_min_ps(_mm512_set1_ps(6.0), _mm512_max_ps(zero, self)),
                }
            }
        }
    }

    /// `R` registers of `V`, each one group of output blocks: the tile of
    /// several groups. Loops over `R` unroll; every lane is still one FMA
    /// chain, so the bits are those of `V` alone. (No closures here: they
    /// would be compiled without the caller's instructions if not inlined.)
    #[derive(Clone, Copy)]
    pub(super) struct Wide<V, const R: usize>([V; R]);

    impl<V: Lanes, const R: usize> Lanes for Wide<V, R> {
        const OB: usize = V::OB * R;
        const STEP: usize = V::STEP;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // Contiguous: each register's blocks right after the previous's.
            unsafe { Self::load_weights(p, V::OB * LANES) }
        }
        #[inline(always)]
        unsafe fn load_weights(p: *const f32, group_stride: usize) -> Self {
            unsafe {
                let mut all = [V::load(p); R];
                for (r, v) in all.iter_mut().enumerate().skip(1) {
                    *v = V::load(p.add(r * group_stride));
                }
                Wide(all)
            }
        }
        #[inline(always)]
        unsafe fn load_blocks(p: *const f32, stride: usize) -> Self {
            unsafe {
                let mut all = [V::load_blocks(p, stride); R];
                for (r, v) in all.iter_mut().enumerate().skip(1) {
                    *v = V::load_blocks(p.add(r * V::OB * stride), stride);
                }
                Wide(all)
            }
        }
        #[inline(always)]
        unsafe fn store_blocks(self, p: *mut f32, stride: usize) {
            for (r, v) in self.0.iter().enumerate() {
                unsafe { v.store_blocks(p.add(r * V::OB * stride), stride) }
            }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> Self {
            unsafe { Wide([V::splat(p); R]) }
        }
        #[inline(always)]
        unsafe fn fma(w: Self, x: Self, mut acc: Self) -> Self {
            for r in 0..R {
                acc.0[r] = unsafe { V::fma(w.0[r], x.0[r], acc.0[r]) };
            }
            acc
        }
        #[inline(always)]
        unsafe fn add(mut self, o: Self) -> Self {
            for r in 0..R {
                self.0[r] = unsafe { self.0[r].add(o.0[r]) };
            }
            self
        }
        #[inline(always)]
        unsafe fn act(mut self, act: Act) -> Self {
            for r in 0..R {
                self.0[r] = unsafe { self.0[r].act(act) };
            }
            self
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<const OB: usize, const PX: usize, const CI: usize, const S: usize>(
        w: &Walk,
        t: &Tile<'_>,
        out: &mut Out<'_>,
    ) {
        // SAFETY: the caller's.
        unsafe {
            match OB {
                1 => tile::<__m256, PX, CI, S>(w, t, out),
                2 => tile::<Pair, PX, CI, S>(w, t, out),
                _ => tile::<Wide<Pair, 2>, PX, CI, S>(w, t, out),
            }
        }
    }

    /// With VL, one block's kernel also has 32 registers.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn avx512<
        const OB: usize,
        const PX: usize,
        const CI: usize,
        const S: usize,
    >(
        w: &Walk,
        t: &Tile<'_>,
        out: &mut Out<'_>,
    ) {
        // SAFETY: the caller's.
        unsafe {
            match OB {
                1 => tile::<__m256, PX, CI, S>(w, t, out),
                2 => tile::<__m512, PX, CI, S>(w, t, out),
                _ => tile::<Wide<__m512, 2>, PX, CI, S>(w, t, out),
            }
        }
    }

    /// The tile: `PX` pixels' accumulators held in registers over the whole K
    /// loop, one weight register per step, the input broadcast from memory.
    ///
    /// # Safety
    /// The CPU has `V`'s instructions, and `super::check` passed.
    // Indices name registers (acc[p]); iterators would hide the tile's shape.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<V: Lanes, const PX: usize, const CI: usize, const S: usize>(
        w: &Walk,
        t: &Tile<'_>,
        out: &mut Out<'_>,
    ) {
        // SAFETY (whole body): `super::check` bounded every offset used here.
        unsafe {
            let dst = out.as_mut_ptr();
            let bias = V::load(t.bias.as_ptr());
            let mut acc = [bias; PX];
            let (out_at, x) = (dst.add(t.out_at), t.x.as_ptr().add(t.x_at));
            for p in 0..PX {
                let at = t.out_at + p * LANES;
                acc[p] = match t.residual {
                    _ if t.accumulate => V::load_blocks(dst.add(at), t.out_stride),
                    Some(r) => bias.add(V::load_blocks(r.as_ptr().add(at), t.out_stride)),
                    None => bias,
                };
            }
            let mut wp = t.weights.as_ptr();
            for b in 0..w.blocks {
                for ky in 0..w.kh {
                    for kx in 0..w.kw {
                        let at = b * w.block_stride + ky * w.row_stride + kx * w.pixel_stride;
                        for i in 0..CI {
                            let wv = V::load_weights(wp, t.group_stride);
                            wp = wp.add(V::STEP);
                            for p in 0..PX {
                                let xv = V::splat(x.add(p * S * CI + at + i));
                                acc[p] = V::fma(wv, xv, acc[p]);
                            }
                        }
                    }
                }
            }
            for p in 0..PX {
                acc[p]
                    .act(t.act)
                    .store_blocks(out_at.add(p * LANES), t.out_stride);
            }
        }
    }
}
