#!/usr/bin/env python3
"""Checks src/patch/kernel/add_scale.cu without the Rust binary: CuPy compiles it with NVRTC
(the same options as src/patch/kernel/cuda.rs), this script packs the descriptor table the
kernel reads, launches it on random layers, and compares with an independent NumPy
implementation of the formula in src/patch/kernel/mod.rs, computed in float64:

    w[o,j]  = (W[o,j] + sum_i alpha_i * dq_i(D_i)[o,j]) * s[o]
    p'[o]   = p[o] + sum_i alpha_i * dq_i(dp_i)[o]        for gamma, beta, mean
    var'[o] = var[o] * exp(sum_i alpha_i * dq_i(dvar_i)[o])
    s[o]    = gamma'[o] / sqrt(var'[o] + eps)
    b[o]    = beta'[o] - s[o] * mean'[o]

dq: f32 as is, f16 widened, int8/int4 `code * scale[row] + offset[row]` (int4: two
codes per byte, low nibble first, rows padded to whole bytes).

Every storage form, 1-3 signatures, several layers per launch, the output poisoned
with NaN first; then the error cases (negative variance, non-finite output), decoded
from the status word. Pass: max |gpu - ref| / max |ref| <= 2e-6 per output tensor: the
float32 kernel against float64 truth carries a few roundings of 2^-24 per element (up
to ~15 in the worst case, expf counting 4); `rws bench gpu` compares the kernel with the
CPU kernel, which performs the same float32 operations, at 1e-6.

Usage: check_kernel_cupy.py [--json FILE] [--emulate]; exit status 0 when everything
passed. --emulate needs no GPU: it compiles add_scale.cu with the host C++ compiler and
stand-ins for the CUDA built-ins, and runs each block's threads one after another (the
kernel uses no shared memory or barriers, so that is a faithful schedule). It checks the
kernel's logic, this script's table layout and its reference on any machine.
"""

import argparse
import ctypes
import json
import pathlib
import struct
import subprocess
import sys
import tempfile

import numpy as np

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "src" / "patch" / "kernel" / "add_scale.cu"
OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")
BLOCK = 256
TOLERANCE = 2e-6
KINDS = {"f32": 0, "f16": 1, "int8": 2, "int4": 3}
EPS = 1e-5


class Delta:
    """One stored delta tensor: values (f32/f16) or codes with a per-row affine."""

    def __init__(self, kind, rows, cols, rng, lo, hi):
        self.kind, self.rows, self.cols = kind, rows, cols
        if kind in ("f32", "f16"):
            self.values = rng.uniform(lo, hi, rows * cols).astype(np.float32 if kind == "f32" else np.float16)
        else:
            levels = 255 if kind == "int8" else 15
            codes = rng.integers(0, levels + 1, (rows, cols), dtype=np.uint8)
            self.scale = rng.uniform(0, (hi - lo) / levels, rows).astype(np.float32)
            self.offset = rng.uniform(lo, 0, rows).astype(np.float32)
            if kind == "int8":
                self.codes = codes.reshape(-1)
            else:
                padded = np.zeros((rows, 2 * ((cols + 1) // 2)), np.uint8)
                padded[:, :cols] = codes
                self.codes = (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1)
            self._codes = codes

    def dequantize(self):
        """The values as float64, flat, row-major."""
        if self.kind in ("f32", "f16"):
            return self.values.astype(np.float64)
        v = self._codes.astype(np.float64) * self.scale[:, None].astype(np.float64)
        return (v + self.offset[:, None].astype(np.float64)).reshape(-1)

    def upload(self, dev, keep):
        """Device pointers (data, scale, offset); `keep` holds the arrays alive."""
        if self.kind in ("f32", "f16"):
            return dev.upload(self.values, keep), 0, 0
        return tuple(dev.upload(a, keep) for a in (self.codes, self.scale, self.offset))


class Layer:
    def __init__(self, rng, o, cols):
        self.o, self.cols = o, cols
        self.weight = rng.uniform(-0.2, 0.2, o * cols).astype(np.float32)
        self.gamma = rng.uniform(0.5, 1.5, o).astype(np.float32)
        self.beta = rng.uniform(-0.5, 0.5, o).astype(np.float32)
        self.mean = rng.uniform(-0.3, 0.3, o).astype(np.float32)
        self.var = rng.uniform(0.2, 2.0, o).astype(np.float32)
        self.sigs = []  # (alpha, {part: Delta})

    def add_sig(self, rng, alpha, weight_kind, bn_kind):
        parts = {}
        if weight_kind:
            parts["weight"] = Delta(weight_kind, self.o, self.cols, rng, -0.05, 0.05)
        if bn_kind:
            # 1-D int deltas are one row (the kernel's general DeltaView::at path).
            rows, cols = (1, self.o) if bn_kind.startswith("int") else (self.o, 1)
            for part, (lo, hi) in zip(("gamma", "beta", "mean", "var"),
                                      ((-0.1, 0.1), (-0.1, 0.1), (-0.05, 0.05), (-0.1, 0.1))):
                parts[part] = Delta(bn_kind, rows, cols, rng, lo, hi)
        self.sigs.append((alpha, parts))

    def reference(self):
        """(weight, bias, error): the formula in float64; error like the CPU kernel's."""
        f = np.float64
        acc = {p: getattr(self, p).astype(f) for p in ("weight", "gamma", "beta", "mean")}
        log_scale = np.zeros(self.o)
        for alpha, parts in self.sigs:
            for p, d in parts.items():
                if p == "var":
                    log_scale += f(alpha) * d.dequantize()
                else:
                    acc[p] = acc[p] + f(alpha) * d.dequantize()
        var = self.var.astype(f) * np.exp(log_scale)
        denom = var + f(np.float32(EPS))
        bad = np.flatnonzero(~(denom > 0))
        if bad.size:
            return None, None, ("negative variance", int(bad[0]))
        s = acc["gamma"] / np.sqrt(denom)
        w = acc["weight"].reshape(self.o, self.cols) * s[:, None]
        b = acc["beta"] - s * acc["mean"]
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(w.astype(np.float32)).all(axis=1) & np.isfinite(b.astype(np.float32))
        if not finite.all():
            return None, None, ("not finite", int(np.flatnonzero(~finite)[0]))
        return w.reshape(-1), b, None


def pack_delta(ptrs, d):
    if d is None:
        return bytes(32)
    return struct.pack("<QQQII", *ptrs, KINDS[d.kind], d.cols if d.kind.startswith("int") else 0)


class Cuda:
    """The kernel on the GPU, through CuPy (which compiles it with NVRTC)."""

    def __init__(self):
        try:
            import cupy
        except ImportError:
            sys.exit("check_kernel_cupy.py needs CuPy (pip install cupy-cuda13x) and a GPU; "
                     "or pass --emulate")
        self.cp = cupy
        self.kernel = cupy.RawKernel(SOURCE.read_text(), "rws_fused_add_scale", options=OPTIONS)
        self.name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()

    def upload(self, host, keep):
        a = self.cp.asarray(host)
        keep.append(a)
        return a.data.ptr

    def run(self, grid, table, out):
        """Launches on `table` (bytes) into `out` (float32, host); returns (out, table)."""
        t, o = self.cp.asarray(np.frombuffer(table, np.uint8)), self.cp.asarray(out)
        self.kernel((grid,), (BLOCK,), self.args(t.data.ptr, o.data.ptr))
        self.cp.cuda.Device().synchronize()
        return self.cp.asnumpy(o), self.cp.asnumpy(t)

    def args(self, base, out):
        return (np.uint64(base + 8), np.uint32(self.n_layers), np.uint64(base + self.sigs_at),
                np.uint64(out), np.uint64(base))


SHIM = r"""
// Host stand-ins for the CUDA built-ins add_scale.cu uses; blocks and threads run in turn.
#include <cmath>
#include <cstring>
struct Dim { unsigned int x; };
static Dim blockIdx, threadIdx, blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __align__(n) alignas(n)
using std::isfinite;
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
    unsigned long long old = *a; if (v < old) *a = v; return old;
}
#include "add_scale.cu"
extern "C" void run(unsigned int grid, unsigned int block, const Layer* layers, unsigned int n,
                    const Signature* sigs, float* out, unsigned long long* status) {
    blockDim.x = block;
    for (blockIdx.x = 0; blockIdx.x < grid; ++blockIdx.x)
        for (threadIdx.x = 0; threadIdx.x < block; ++threadIdx.x)
            rws_fused_add_scale(layers, n, sigs, out, status);
}
"""


class Emulated:
    """The kernel compiled for the host (see --emulate)."""

    def __init__(self):
        self.dir = tempfile.TemporaryDirectory()
        shim, lib = pathlib.Path(self.dir.name, "shim.cpp"), pathlib.Path(self.dir.name, "k.so")
        shim.write_text(SHIM)
        # -ffp-contract=off: no FMA contraction, like --fmad=false.
        subprocess.run(["c++", "-std=c++17", "-O2", "-ffp-contract=off", "-shared", "-fPIC",
                        "-I", str(SOURCE.parent), str(shim), "-o", str(lib)], check=True)
        self.lib = ctypes.CDLL(str(lib))
        self.name = "host emulation"

    def upload(self, host, keep):
        a = np.ascontiguousarray(host).copy()
        keep.append(a)
        return a.ctypes.data

    def run(self, grid, table, out):
        t = np.frombuffer(bytearray(table), np.uint8)
        o = out.copy()
        p = ctypes.c_void_p
        self.lib.run(ctypes.c_uint(grid), ctypes.c_uint(BLOCK), p(t.ctypes.data + 8),
                     ctypes.c_uint(self.n_layers), p(t.ctypes.data + self.sigs_at),
                     p(o.ctypes.data), p(t.ctypes.data))
        return o, t


def launch(dev, layers):
    """Runs every layer in one launch; returns (host output, offsets, status word)."""
    keep, layer_bytes, sig_bytes = [], b"", b""
    offsets, length, first_block, first_sig = [], 0, 0, 0

    def take(n):
        nonlocal length
        at = length
        length += -(-n // 64) * 64
        return at

    for layer in layers:
        offsets.append((take(layer.o * layer.cols), take(layer.o)))
    for i, layer in enumerate(layers):
        clean = [dev.upload(getattr(layer, p), keep) for p in ("weight", "gamma", "beta", "mean", "var")]
        layer_bytes += struct.pack("<QQQQQQQIIIIIf", *clean, *offsets[i],
                                   layer.o, layer.cols, first_block, first_sig, len(layer.sigs), EPS)
        first_block += layer.o
        first_sig += len(layer.sigs)
        for alpha, parts in layer.sigs:
            for p in ("weight", "gamma", "beta", "mean", "var"):
                d = parts.get(p)
                sig_bytes += pack_delta(d.upload(dev, keep) if d else None, d)
            sig_bytes += struct.pack("<fI", alpha, 0)
    assert len(layer_bytes) == 80 * len(layers)
    dev.n_layers, dev.sigs_at = len(layers), 8 + len(layer_bytes)
    table = struct.pack("<Q", 2**64 - 1) + layer_bytes + sig_bytes
    out, table = dev.run(first_block, table, np.full(length, np.nan, np.float32))
    return out, offsets, int(table[:8].view(np.uint64)[0])


def decode(status):
    if status == 2**64 - 1:
        return None
    layer, channel, kind = status >> 54, (status >> 33) & ((1 << 21) - 1), (status >> 32) & 1
    return layer, ("negative variance" if kind == 0 else "not finite", channel)


def rel_err(gpu, ref):
    if not np.isfinite(gpu).all():
        return float("inf")
    scale = np.abs(ref).max()
    diff = np.abs(gpu.astype(np.float64) - ref).max()
    return float(diff / scale if scale > 0 else diff)


SHAPES = [(64, 147), (64, 576), (16, 27), (256, 64), (33, 75), (128, 1152), (1, 1)]


def cases(rng):
    alphas, bn = [0.7, -0.4, 1.3], ["f32", "f16", "int8"]
    yield "clean", [Layer(rng, o, c) for o, c in SHAPES]
    for qi, q in enumerate(KINDS):
        for n in (1, 2, 3):
            layers = [Layer(rng, o, c) for o, c in SHAPES]
            for layer in layers:
                for k in range(n):
                    w = None if (n == 3 and k == 1) else list(KINDS)[(qi + k) % 4]
                    layer.add_sig(rng, alphas[k], w, bn[k])
            yield f"{q} x{n}", layers
    layers = [Layer(rng, o, c) for o, c in SHAPES]
    for layer in layers:
        layer.add_sig(rng, 0.5, "int8", None)
    for i, c in ((1, 50), (1, 37), (4, 5)):
        layers[i].var[c] = -1.0
    yield "negative variance", layers
    layers = [Layer(rng, o, c) for o, c in SHAPES]
    for layer in layers:
        layer.add_sig(rng, 0.5, "int8", None)
    big = Delta("f32", layers[1].o, layers[1].cols, rng, 50.0, 100.0)
    layers[1].sigs = [(1e38, {"weight": big})]
    yield "overflow", layers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--emulate", action="store_true", help="run on the CPU (no GPU needed)")
    args = ap.parse_args()
    dev = Emulated() if args.emulate else Cuda()
    rng = np.random.default_rng(2024)
    report = {"device": dev.name,
              "layers": 0, "error_cases": 0, "max_rel_err_weight": 0.0, "max_rel_err_bias": 0.0,
              "failures": []}
    for name, layers in cases(rng):
        refs = [layer.reference() for layer in layers]
        want = next(((i, r[2]) for i, r in enumerate(refs) if r[2]), None)
        host, offsets, status = launch(dev, layers)
        got = decode(status)
        if want or got:
            if want == got:
                report["error_cases"] += 1
            else:
                report["failures"].append(f"{name}: reference error {want}, kernel {got}")
            continue
        for i, ((w, b, _), layer) in enumerate(zip(refs, layers)):
            w_at, b_at = offsets[i]
            ew = rel_err(host[w_at:w_at + w.size], w)
            eb = rel_err(host[b_at:b_at + b.size], b)
            report["layers"] += 1
            report["max_rel_err_weight"] = max(report["max_rel_err_weight"], ew)
            report["max_rel_err_bias"] = max(report["max_rel_err_bias"], eb)
            if ew > TOLERANCE or eb > TOLERANCE:
                report["failures"].append(
                    f"{name}: layer {i} ({layer.o}x{layer.cols}): rel err {ew:.2e} (weight), {eb:.2e} (bias)")
    report["passed"] = not report["failures"]
    print(json.dumps(report, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
