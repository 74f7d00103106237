// The fused add-scale on the GPU: the served weights of every patched conv layer of a
// stem, in one launch. The math is the formula in src/patch/kernel/mod.rs; this file mirrors
// src/patch/kernel/cpu.rs operation for operation so the two agree to a few ulps:
//
//   * compiled with --fmad=false (Rust never contracts a * b + c into an FMA either),
//     --prec-div=true --prec-sqrt=true --ftz=false, so every +, *, / and sqrt is the
//     same IEEE operation in the same order as on the CPU;
//   * weight deltas are added in signature order onto W, then the sum is scaled once;
//     an int delta's element is `code * (alpha * scale[o]) + alpha * offset[o]`
//     (alpha folded into the row's affine, as rows::accumulate_row (rows.rs) does);
//   * a BatchNorm delta's element is `code * scale[r] + offset[r]` (DeltaView::at),
//     then added as `p += alpha * value`;
//   * running-variance deltas are log ratios: var' = var * expf(sum alpha_i * d_i).
//     expf is the one function that may differ from the CPU's libm (CUDA documents
//     2 ulp), and only when a signature carries variance deltas.
//
// Grid: one block per (layer, output channel) row; the block's threads stride over the
// row, four elements at a time where the row's length and alignment allow (vec4_ok).
// Every input byte is read once, every output written once. Compiled at run time by
// NVRTC (src/patch/kernel/cuda.rs), which also builds the descriptor table below; keep the two
// layouts in step (the static_asserts pin the sizes).

// How a delta is stored (quant::Quant).
#define KIND_F32 0u
#define KIND_F16 1u
#define KIND_INT8 2u
#define KIND_INT4 3u

// Elements of a row each thread has in flight at once (see the weight loop).
#define ELEMS 4u

// Which parameter of a layer a delta patches: the index into Signature::parts.
#define PART_WEIGHT 0
#define PART_GAMMA 1
#define PART_BETA 2
#define PART_MEAN 3
#define PART_VAR 4

// One stored delta tensor, as quant::DeltaView holds it. data == 0: absent.
struct Delta {
    const void* data;       // f32 or f16 values, or u8 codes (int4: two per byte, low nibble first)
    const float* scale;     // int forms: one per row
    const float* offset;    // int forms: one per row
    unsigned int kind;      // KIND_*
    unsigned int cols;      // int forms: elements per row
};
static_assert(sizeof(Delta) == 32, "Delta layout is shared with cuda.rs");

// One signature's contribution to one layer (kernel::LayerDelta).
struct Signature {
    Delta parts[5];         // PART_*
    float alpha;
    unsigned int pad;
};
static_assert(sizeof(Signature) == 168, "Signature layout is shared with cuda.rs");

// One layer: its clean parameters (kernel::ConvBn) and where its outputs go.
struct Layer {
    const float* weight;    // [out_channels, cols]
    const float* gamma;
    const float* beta;
    const float* mean;
    const float* var;
    unsigned long long out_w;   // element offset of the folded weight in `out`
    unsigned long long out_b;   // element offset of the folded bias in `out`
    unsigned int out_channels;
    unsigned int cols;
    unsigned int first_block;   // blockIdx.x of this layer's channel 0
    unsigned int first_sig;     // index of this layer's first Signature
    unsigned int n_sigs;
    float eps;
};
static_assert(sizeof(Layer) == 80, "Layer layout is shared with cuda.rs");

// Failure report: atomicMin of (layer << 54 | channel << 33 | kind << 32 | var bits), so
// the host sees the lowest failing layer, then channel, like the CPU's sequential fold.
// kind 0: negative (or NaN) variance, kind 1: non-finite output. ~0 means success.
__device__ __forceinline__ void report(unsigned long long* status, unsigned int layer,
                                       unsigned int channel, unsigned int kind, float var) {
    unsigned long long key = ((unsigned long long)layer << 54) | ((unsigned long long)channel << 33) |
                             ((unsigned long long)kind << 32) | (unsigned long long)__float_as_uint(var);
    atomicMin(status, key);
}

// Exact f16 -> f32 (the same bit manipulation as quant::f16_to_f32), without cuda_fp16.h.
__device__ __forceinline__ float f16_to_f32(unsigned short h16) {
    const unsigned int shifted_exp = 0x7c00u << 13;
    unsigned int h = h16;
    unsigned int o = ((h & 0x7fffu) << 13) + ((127u - 15u) << 23);
    unsigned int exp = (h << 13) & shifted_exp;
    if (exp == shifted_exp) {
        o += (128u - 16u) << 23;  // Inf/NaN
    } else if (exp == 0) {
        o = __float_as_uint(__uint_as_float(o + (1u << 23)) - __uint_as_float(113u << 23));
    }
    return __uint_as_float(o | ((h & 0x8000u) << 16));
}

// Code of element c of row r of an int delta with `cols` elements per row.
__device__ __forceinline__ unsigned int code_at(const unsigned char* q, unsigned int kind,
                                                unsigned long long r, unsigned int c,
                                                unsigned int cols) {
    if (kind == KIND_INT8) return q[r * cols + c];
    unsigned char byte = q[r * ((cols + 1) / 2) + c / 2];
    return (c & 1u) ? (byte >> 4) : (byte & 0x0fu);
}

// Element i of a 1-D delta (DeltaView::at): code * scale[r] + offset[r] for int forms.
__device__ __forceinline__ float delta_at(const Delta& d, unsigned int i) {
    switch (d.kind) {
        case KIND_F32: return ((const float*)d.data)[i];
        case KIND_F16: return f16_to_f32(((const unsigned short*)d.data)[i]);
        default: {
            unsigned int r = i / d.cols, c = i % d.cols;
            float code = (float)code_at((const unsigned char*)d.data, d.kind, r, c, d.cols);
            return code * d.scale[r] + d.offset[r];
        }
    }
}

// p[o] + sum_i alpha_i * dp_i[o], in signature order.
__device__ __forceinline__ float patched(float p, const Signature* sigs, unsigned int n,
                                         int part, unsigned int o) {
    for (unsigned int k = 0; k < n; ++k) {
        const Delta& d = sigs[k].parts[part];
        if (d.data) p = p + sigs[k].alpha * delta_at(d, o);
    }
    return p;
}

// Row o of a layer's folded weight, one element at a time: any row length and alignment.
// Each thread carries ELEMS elements a block-width apart, so it has ELEMS independent
// loads in flight per input and reads each delta's descriptor once per ELEMS elements.
// Per element the operations are: acc = W; acc += term_i in signature order;
// out = acc * s. Returns whether an output is not finite.
__device__ __forceinline__ bool fold_row(const float* __restrict__ w, float* __restrict__ row,
                                         const Signature* sigs, unsigned int n, unsigned int o,
                                         unsigned int cols, float s) {
    const unsigned long long row_start = (unsigned long long)o * cols;
    bool bad = false;
    for (unsigned int base = threadIdx.x; base < cols; base += ELEMS * blockDim.x) {
        float acc[ELEMS];
#pragma unroll
        for (unsigned int u = 0; u < ELEMS; ++u) {
            unsigned int j = base + u * blockDim.x;
            acc[u] = j < cols ? w[j] : 0.0f;
        }
        for (unsigned int k = 0; k < n; ++k) {
            const Delta& d = sigs[k].parts[PART_WEIGHT];
            if (!d.data) continue;
            const float alpha = sigs[k].alpha;
            if (d.kind == KIND_F32) {
                const float* v = (const float*)d.data + row_start;
#pragma unroll
                for (unsigned int u = 0; u < ELEMS; ++u) {
                    unsigned int j = base + u * blockDim.x;
                    if (j < cols) acc[u] = acc[u] + alpha * v[j];
                }
            } else if (d.kind == KIND_F16) {
                const unsigned short* v = (const unsigned short*)d.data + row_start;
#pragma unroll
                for (unsigned int u = 0; u < ELEMS; ++u) {
                    unsigned int j = base + u * blockDim.x;
                    if (j < cols) acc[u] = acc[u] + alpha * f16_to_f32(v[j]);
                }
            } else {
                // alpha folded into the row's affine, as rows::accumulate_row (rows.rs) does.
                const float a = alpha * d.scale[o];
                const float b = alpha * d.offset[o];
                const unsigned char* q = (const unsigned char*)d.data;
#pragma unroll
                for (unsigned int u = 0; u < ELEMS; ++u) {
                    unsigned int j = base + u * blockDim.x;
                    if (j < cols) acc[u] = acc[u] + ((float)code_at(q, d.kind, o, j, cols) * a + b);
                }
            }
        }
#pragma unroll
        for (unsigned int u = 0; u < ELEMS; ++u) {
            unsigned int j = base + u * blockDim.x;
            if (j < cols) {
                float x = acc[u] * s;
                row[j] = x;
                bad |= !isfinite(x);
            }
        }
    }
    return bad;
}

// Four consecutive elements, moved with one aligned load or store each: 16 bytes of
// weights, 8 of f16, 4 of int8 codes, 2 of int4 codes. One-byte loads leave a warp
// with 32 bytes per load instruction, too few in flight to reach memory speed.
struct __align__(16) F32x4 { float v[4]; };
struct __align__(8) F16x4 { unsigned short v[4]; };
struct __align__(4) I8x4 { unsigned char v[4]; };
struct __align__(2) I4x4 { unsigned char v[2]; };

__device__ __forceinline__ bool aligned(const void* p, unsigned long long bytes) {
    return ((unsigned long long)p & (bytes - 1)) == 0;
}

// Whether row o can take the four-wide path: whole groups of four in every row, and
// every weight input and the output aligned for its vector type.
__device__ __forceinline__ bool vec4_ok(const float* w, const float* row, const Signature* sigs,
                                        unsigned int n, unsigned int o, unsigned int cols) {
    if (cols % 4u != 0u || !aligned(w, 16) || !aligned(row, 16)) return false;
    const unsigned long long row_start = (unsigned long long)o * cols;
    for (unsigned int k = 0; k < n; ++k) {
        const Delta& d = sigs[k].parts[PART_WEIGHT];
        if (!d.data) continue;
        const unsigned char* q = (const unsigned char*)d.data;
        bool ok = d.kind == KIND_F32    ? aligned(q + 4 * row_start, 16)
                  : d.kind == KIND_F16  ? aligned(q + 2 * row_start, 8)
                  : d.kind == KIND_INT8 ? aligned(q + row_start, 4)
                                        : aligned(q + row_start / 2, 2);
        if (!ok) return false;
    }
    return true;
}

// fold_row for rows vec4_ok accepts: the same operations on every element, in the same
// order, four consecutive elements per thread and step.
__device__ __forceinline__ bool fold_row_vec4(const float* __restrict__ w, float* __restrict__ row,
                                              const Signature* sigs, unsigned int n, unsigned int o,
                                              unsigned int cols, float s) {
    const unsigned long long row_start = (unsigned long long)o * cols;
    const unsigned int groups = cols / 4u;
    bool bad = false;
    for (unsigned int base = threadIdx.x; base < groups; base += ELEMS * blockDim.x) {
        float acc[ELEMS][4];
#pragma unroll
        for (unsigned int u = 0; u < ELEMS; ++u) {
            unsigned int g = base + u * blockDim.x;
            if (g < groups) {
                F32x4 x = ((const F32x4*)w)[g];
#pragma unroll
                for (unsigned int e = 0; e < 4; ++e) acc[u][e] = x.v[e];
            }
        }
        for (unsigned int k = 0; k < n; ++k) {
            const Delta& d = sigs[k].parts[PART_WEIGHT];
            if (!d.data) continue;
            const float alpha = sigs[k].alpha;
            const unsigned char* q = (const unsigned char*)d.data;
            if (d.kind == KIND_F32) {
                const F32x4* v = (const F32x4*)(q + 4 * row_start);
#pragma unroll
                for (unsigned int u = 0; u < ELEMS; ++u) {
                    unsigned int g = base + u * blockDim.x;
                    if (g >= groups) continue;
                    F32x4 x = v[g];
#pragma unroll
                    for (unsigned int e = 0; e < 4; ++e) acc[u][e] = acc[u][e] + alpha * x.v[e];
                }
            } else if (d.kind == KIND_F16) {
                const F16x4* v = (const F16x4*)(q + 2 * row_start);
#pragma unroll
                for (unsigned int u = 0; u < ELEMS; ++u) {
                    unsigned int g = base + u * blockDim.x;
                    if (g >= groups) continue;
                    F16x4 x = v[g];
#pragma unroll
                    for (unsigned int e = 0; e < 4; ++e)
                        acc[u][e] = acc[u][e] + alpha * f16_to_f32(x.v[e]);
                }
            } else {
                const float a = alpha * d.scale[o];
                const float b = alpha * d.offset[o];
#pragma unroll
                for (unsigned int u = 0; u < ELEMS; ++u) {
                    unsigned int g = base + u * blockDim.x;
                    if (g >= groups) continue;
                    unsigned int c[4];
                    if (d.kind == KIND_INT8) {
                        I8x4 x = ((const I8x4*)(q + row_start))[g];
#pragma unroll
                        for (unsigned int e = 0; e < 4; ++e) c[e] = x.v[e];
                    } else {
                        I4x4 x = ((const I4x4*)(q + row_start / 2))[g];
                        c[0] = x.v[0] & 0x0fu;
                        c[1] = x.v[0] >> 4;
                        c[2] = x.v[1] & 0x0fu;
                        c[3] = x.v[1] >> 4;
                    }
#pragma unroll
                    for (unsigned int e = 0; e < 4; ++e) acc[u][e] = acc[u][e] + ((float)c[e] * a + b);
                }
            }
        }
#pragma unroll
        for (unsigned int u = 0; u < ELEMS; ++u) {
            unsigned int g = base + u * blockDim.x;
            if (g >= groups) continue;
            F32x4 y;
#pragma unroll
            for (unsigned int e = 0; e < 4; ++e) {
                y.v[e] = acc[u][e] * s;
                bad |= !isfinite(y.v[e]);
            }
            ((F32x4*)row)[g] = y;
        }
    }
    return bad;
}

extern "C" __global__ void rws_fused_add_scale(const Layer* __restrict__ layers, unsigned int n_layers,
                                               const Signature* __restrict__ all_sigs,
                                               float* __restrict__ out,
                                               unsigned long long* __restrict__ status) {
    // A stem has a handful of layers: a linear scan beats a search.
    unsigned int l = 0;
    while (l + 1 < n_layers && blockIdx.x >= layers[l + 1].first_block) ++l;
    const Layer& L = layers[l];
    const unsigned int o = blockIdx.x - L.first_block;
    const unsigned int cols = L.cols;
    const Signature* sigs = all_sigs + L.first_sig;
    const unsigned int n = L.n_sigs;

    // The BatchNorm fold for channel o, computed by every thread (warp-uniform loads
    // are broadcasts; this saves a shared-memory round trip and a barrier).
    float gamma = patched(L.gamma[o], sigs, n, PART_GAMMA, o);
    float beta = patched(L.beta[o], sigs, n, PART_BETA, o);
    float mean = patched(L.mean[o], sigs, n, PART_MEAN, o);
    float log_scale = 0.0f;
    for (unsigned int k = 0; k < n; ++k) {
        const Delta& d = sigs[k].parts[PART_VAR];
        if (d.data) log_scale = log_scale + sigs[k].alpha * delta_at(d, o);
    }
    float var = L.var[o] * expf(log_scale);
    float denom = var + L.eps;
    if (!(denom > 0.0f)) {  // NaN counts as negative: it cannot be folded either
        if (threadIdx.x == 0) report(status, l, o, 0u, var);
        return;
    }
    float s = gamma / sqrtf(denom);

    const unsigned long long row_start = (unsigned long long)o * cols;
    const float* __restrict__ w = L.weight + row_start;
    float* __restrict__ row = out + L.out_w + row_start;
    const bool bad = vec4_ok(w, row, sigs, n, o, cols) ? fold_row_vec4(w, row, sigs, n, o, cols, s)
                                                       : fold_row(w, row, sigs, n, o, cols, s);
    float bias = beta - s * mean;
    bool bias_bad = false;
    if (threadIdx.x == 0) {
        out[L.out_b + o] = bias;
        bias_bad = !isfinite(bias);
    }
    if (bad || bias_bad) report(status, l, o, 1u, 0.0f);
}
