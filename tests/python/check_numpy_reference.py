#!/usr/bin/env python3
"""Checks tests/python/numpy_reference.py against onnxruntime, without rws.

For every architecture it writes a random model (model.toml + base.safetensors,
float32) into a temporary directory, runs it through the NumPy reference and
through the ONNX graph that benches/onnx_baseline.py builds (Conv, BatchNormalization,
MaxPool, ... run by onnxruntime in float32, graph optimisations off), and compares
the logits. The models are narrow (a quarter or less of the real widths) but keep
the real depths, names and strides; inputs have odd, non-square sizes where the
network allows, so that padding and pooling edges are exercised. The tensor names
and shapes generated here are those of torchvision / timm at full width, checked
against the parameter counts of those libraries (and, when given, against real
model directories).

Those graphs find each network's blocks from the tensor names, where the NumPy
reference walks fixed tables, and use onnxruntime's own padding (auto_pad
SAME_UPPER for TensorFlow's "SAME"). So this also checks the baseline's graphs.

    check_numpy_reference.py                 # all architectures, small; a few seconds
    check_numpy_reference.py --full vgg16    # real widths at 224x224 (vgg16-cifar 32x32), 2 images, timed
    check_numpy_reference.py --compare-names models/mnist-resnet /tmp/lite0

Exits non-zero when any check fails or a relative error (max |numpy - onnx| / max |onnx|) exceeds
--tolerance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "benches"))
import numpy_reference as ref  # noqa: E402
from onnx_baseline import build  # noqa: E402

# --------------------------------------------------------------------------------
# Tensor names and shapes, from torchvision's and timm's model definitions.


def bn(out, name, c):
    for p in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.{p}"] = (c,)


def resnet_shapes(arch, classes, in_ch, width=64, small=None):
    out = {}
    if small:
        widths, depths, bottleneck = small["widths"], small["depths"], False
        stem, k = widths[0], 3
    else:
        depths, bottleneck = {"resnet18": ([2, 2, 2, 2], False), "resnet34": ([3, 4, 6, 3], False),
                              "resnet50": ([3, 4, 6, 3], True), "resnet101": ([3, 4, 23, 3], True)}[arch]
        widths = [width, 2 * width, 4 * width, 8 * width]
        stem, k = width, 7
    out["conv1.weight"] = (stem, in_ch, k, k)
    bn(out, "bn1", stem)
    c = stem
    exp = 4 if bottleneck else 1
    for s, (d, wd) in enumerate(zip(depths, widths)):
        for b in range(d):
            q = f"layer{s + 1}.{b}"
            if bottleneck:
                out[f"{q}.conv1.weight"] = (wd, c, 1, 1)
                bn(out, f"{q}.bn1", wd)
                out[f"{q}.conv2.weight"] = (wd, wd, 3, 3)
                bn(out, f"{q}.bn2", wd)
                out[f"{q}.conv3.weight"] = (wd * 4, wd, 1, 1)
                bn(out, f"{q}.bn3", wd * 4)
            else:
                out[f"{q}.conv1.weight"] = (wd, c, 3, 3)
                bn(out, f"{q}.bn1", wd)
                out[f"{q}.conv2.weight"] = (wd, wd, 3, 3)
                bn(out, f"{q}.bn2", wd)
            if (b == 0 and s > 0) or c != wd * exp:
                out[f"{q}.downsample.0.weight"] = (wd * exp, c, 1, 1)
                bn(out, f"{q}.downsample.1", wd * exp)
            c = wd * exp
    out["fc.weight"] = (classes, c)
    out["fc.bias"] = (classes,)
    return out


def vgg_shapes(arch, classes, in_ch, widths=(64, 128, 256, 512, 512), hidden=4096):
    """torchvision's vgg16 / vgg16_bn; vgg16-cifar is the RWS paper's (VITA-Group/
    Robust_Weight_Signatures models/vgg.py `vgg16`): vgg16's `features` (no BN),
    then one Linear `classifier` after a global average pool."""
    out = {}
    use_bn = arch == "vgg16-bn"
    i, c = 0, in_ch
    for stage, reps in enumerate((2, 2, 3, 3, 3)):
        for _ in range(reps):
            out[f"features.{i}.weight"] = (widths[stage], c, 3, 3)
            out[f"features.{i}.bias"] = (widths[stage],)
            if use_bn:
                bn(out, f"features.{i + 1}", widths[stage])
            c = widths[stage]
            i += 3 if use_bn else 2
        i += 1  # the max-pool
    if arch == "vgg16-cifar":
        out["classifier.weight"] = (classes, c)
        out["classifier.bias"] = (classes,)
    else:
        for j, (o, n) in enumerate([(hidden, c * 49), (hidden, hidden), (classes, hidden)]):
            out[f"classifier.{3 * j}.weight"] = (o, n)
            out[f"classifier.{3 * j}.bias"] = (o,)
    return out


MBV2_CHANNELS = [32, 16, 24, 32, 64, 96, 160, 320, 1280]


def mobilenet_v2_shapes(classes, in_ch, ch=MBV2_CHANNELS):
    out = {"features.0.0.weight": (ch[0], in_ch, 3, 3)}
    bn(out, "features.0.1", ch[0])
    c, i = ch[0], 1
    for stage, (t, n) in enumerate([(1, 1), (6, 2), (6, 3), (6, 4), (6, 3), (6, 3), (6, 1)]):
        for _ in range(n):
            q, h, j = f"features.{i}.conv", c * t, 0
            if t != 1:
                out[f"{q}.0.0.weight"] = (h, c, 1, 1)
                bn(out, f"{q}.0.1", h)
                j = 1
            out[f"{q}.{j}.0.weight"] = (h, 1, 3, 3)
            bn(out, f"{q}.{j}.1", h)
            out[f"{q}.{j + 1}.weight"] = (ch[stage + 1], h, 1, 1)
            bn(out, f"{q}.{j + 2}", ch[stage + 1])
            c, i = ch[stage + 1], i + 1
    out[f"features.{i}.0.weight"] = (ch[8], c, 1, 1)
    bn(out, f"features.{i}.1", ch[8])
    out["classifier.1.weight"] = (classes, ch[8])
    out["classifier.1.bias"] = (classes,)
    return out


LITE0_CHANNELS = [32, 16, 24, 40, 80, 112, 192, 320, 1280]


def efficientnet_lite0_shapes(classes, in_ch, ch=LITE0_CHANNELS):
    out = {"conv_stem.weight": (ch[0], in_ch, 3, 3)}
    bn(out, "bn1", ch[0])
    c = ch[0]
    for s, (k, n) in enumerate([(3, 1), (3, 2), (5, 2), (3, 3), (5, 3), (5, 4), (3, 1)]):
        for b in range(n):
            q = f"blocks.{s}.{b}"
            if s == 0:
                out[f"{q}.conv_dw.weight"] = (c, 1, k, k)
                bn(out, f"{q}.bn1", c)
                out[f"{q}.conv_pw.weight"] = (ch[1], c, 1, 1)
                bn(out, f"{q}.bn2", ch[1])
            else:
                h = c * 6
                out[f"{q}.conv_pw.weight"] = (h, c, 1, 1)
                bn(out, f"{q}.bn1", h)
                out[f"{q}.conv_dw.weight"] = (h, 1, k, k)
                bn(out, f"{q}.bn2", h)
                out[f"{q}.conv_pwl.weight"] = (ch[s + 1], h, 1, 1)
                bn(out, f"{q}.bn3", ch[s + 1])
            c = ch[s + 1]
    out["conv_head.weight"] = (ch[8], c, 1, 1)
    bn(out, "bn2", ch[8])
    out["classifier.weight"] = (classes, ch[8])
    out["classifier.bias"] = (classes,)
    return out


def full_shapes(arch, classes, in_ch=3, cfg=None):
    if arch.startswith("resnet"):
        return resnet_shapes(arch, classes, in_ch, small=cfg if arch == "resnet-small" else None)
    if arch.startswith("vgg"):
        return vgg_shapes(arch, classes, in_ch)
    if arch == "mobilenet-v2":
        return mobilenet_v2_shapes(classes, in_ch)
    return efficientnet_lite0_shapes(classes, in_ch)


# model.parameters() counts (running statistics excluded): torchvision / timm with 1000
# classes, and the RWS paper's CIFAR vgg16 with 10.
PARAMETERS = {("resnet18", 1000): 11_689_512, ("resnet34", 1000): 21_797_672,
              ("resnet50", 1000): 25_557_032, ("resnet101", 1000): 44_549_160,
              ("vgg16", 1000): 138_357_544, ("vgg16-bn", 1000): 138_365_992,
              ("vgg16-cifar", 10): 14_719_818,
              ("mobilenet-v2", 1000): 3_504_872, ("efficientnet-lite0", 1000): 4_652_008}


def parameter_count(shapes):
    return sum(int(np.prod(s)) for n, s in shapes.items() if "running" not in n)


# --------------------------------------------------------------------------------
# Random models


def random_weights(shapes, rng):
    w = {}
    for name, shape in shapes.items():
        if name.endswith("running_var"):
            v = rng.uniform(0.5, 2.0, shape)
        elif name == "normalize.std":  # vgg16-cifar checkpoints' own normalisation (unread)
            v = rng.uniform(0.2, 0.3, shape)
        elif name.endswith("running_mean") or name == "normalize.mean":
            v = rng.normal(0, 0.2, shape)
        elif len(shape) == 4:
            v = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif len(shape) == 2:
            v = rng.normal(0, np.sqrt(1.0 / shape[1]), shape)
        elif name.endswith(".weight"):  # BatchNorm scale
            v = rng.uniform(0.5, 1.5, shape)
        else:  # biases
            v = rng.normal(0, 0.1, shape)
        w[name] = v.astype(np.float32)
    return w


def write_model(d: Path, arch, weights, classes, channels, size, **extra):
    d.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(d / "base.safetensors"))
    lines = [f'arch = "{arch}"', f"input_size = [{size[0]}, {size[1]}]", f"channels = {channels}",
             f"mean = {[0.5] * channels}", f"std = {[0.25] * channels}",
             "labels = [" + ", ".join(f'"c{i}"' for i in range(classes)) + "]",
             "patchable_blocks = 1"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    (d / "model.toml").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------
# ONNX graphs: benches/onnx_baseline.py's, run unoptimised


def onnx_model(model_dir: Path, weights=None):
    model, _ = build(model_dir, weights)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------
# Cases: (label, arch, shapes, input size, toml extras, channels)


def cases(classes=7):
    q = [c // 4 for c in MBV2_CHANNELS]
    e = [c // 4 for c in LITE0_CHANNELS]
    small = {"widths": [8, 12, 16], "depths": [1, 2, 1], "stem_stride": 2}
    out = []
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
        out.append((arch, arch, resnet_shapes(arch, classes, 3, width=8), (61, 54), {}, 3))
    out.append(("resnet-small (mnist-like, 1 channel)", "resnet-small",
                resnet_shapes("resnet-small", classes, 1, small=small), (28, 28), small, 1))
    s1 = {"widths": [8, 16], "depths": [2, 1], "stem_stride": 1}
    out.append(("resnet-small (stride 1, odd size)", "resnet-small",
                resnet_shapes("resnet-small", classes, 3, small=s1), (17, 13), s1, 3))
    vw = (8, 12, 16, 16, 16)
    for arch, size in (("vgg16", (224, 224)), ("vgg16", (32, 32)), ("vgg16-bn", (70, 75)), ("vgg16-bn", (448, 96))):
        out.append((f"{arch} {size[0]}x{size[1]}", arch, vgg_shapes(arch, classes, 3, vw, 24), size, {}, 3))
    # The RWS paper's CIFAR net: four max-pools, global average pool; 45x38 -> 2x2 by floor
    # pooling. Its checkpoints carry normalize.mean / normalize.std, which must go unread.
    cifar = vgg_shapes("vgg16-cifar", classes, 3, vw)
    out.append(("vgg16-cifar 32x32", "vgg16-cifar", cifar, (32, 32), {}, 3))
    out.append(("vgg16-cifar 45x38 + normalize.* (unread)", "vgg16-cifar",
                {**cifar, "normalize.mean": (3,), "normalize.std": (3,)}, (45, 38), {}, 3))
    out.append(("mobilenet-v2", "mobilenet-v2", mobilenet_v2_shapes(classes, 3, q), (67, 58), {}, 3))
    out.append(("efficientnet-lite0 (eps 1e-3)", "efficientnet-lite0", efficientnet_lite0_shapes(classes, 3, e),
                (67, 58), {"bn_eps": 1e-3}, 3))
    out.append(("efficientnet-lite0 224", "efficientnet-lite0", efficientnet_lite0_shapes(classes, 3, e),
                (224, 224), {}, 3))
    return out


def compare(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run_cases(tmp: Path, tol: float, rng) -> bool:
    ok = True
    for n, (label, arch, shapes, size, extra, ch) in enumerate(cases()):
        d = tmp / f"case{n}"
        write_model(d, arch, random_weights(shapes, rng), 7, ch, size, **extra)
        x = rng.normal(0, 1, (3, ch) + tuple(size)).astype(np.float32)
        head = f"{label:40s} {size[0]:3d}x{size[1]:<3d}"
        try:
            t = time.perf_counter()
            got = ref.Model(d).forward(x)
            secs = time.perf_counter() - t
            want = onnx_model(d).run(None, {"input": x})[0]
        except (Exception, SystemExit) as e:  # the reference exits on unread tensors
            ok = False
            print(f"{head} FAIL: {type(e).__name__}: {e}")
            continue
        err = compare(got, want)
        ok &= err <= tol
        print(f"{head} rel. error {err:.1e}  numpy {secs:5.2f} s"
              f"  |logits| {np.abs(want).max():.3g}{'' if err <= tol else '  FAIL'}")
    return ok


def check_cli(tmp: Path, tol: float, rng) -> bool:
    """The command line: --inputs with --patch (a q8, a q4 and a plain delta, and
    a running variance), and --images."""
    small = {"widths": [8, 16], "depths": [1, 1], "stem_stride": 2}
    d = tmp / "cli"
    base = random_weights(resnet_shapes("resnet-small", 5, 1, small=small), rng)
    write_model(d, "resnet-small", base, 5, 1, (28, 28), **small)
    (d / "signatures").mkdir()
    sig, want = {}, {k: v.astype(np.float64) for k, v in base.items()}
    alpha = 0.7
    for name in ("layer2.0.conv1.weight", "layer1.0.conv2.weight"):  # q8 rows: code * scale + offset
        rows = base[name].shape[0]
        codes = rng.integers(0, 256, (rows, base[name].size // rows), dtype=np.uint8)
        scale, offset = rng.uniform(1e-4, 1e-3, rows), rng.uniform(-0.05, 0.0, rows)
        sig.update({f"{name}.q8": codes, f"{name}.scale": scale.astype(np.float32),
                    f"{name}.offset": offset.astype(np.float32)})
        want[name] += alpha * (codes * scale[:, None].astype(np.float32) + offset[:, None].astype(np.float32)
                               ).reshape(base[name].shape)
    name = "conv1.weight"  # q4: two codes a byte, the low nibble first; rows of 9, padded
    rows, cols = base[name].shape[0], base[name].size // base[name].shape[0]
    codes = rng.integers(0, 16, (rows, cols + cols % 2), dtype=np.uint8)
    codes[:, cols:] = 0
    scale, offset = rng.uniform(1e-3, 1e-2, rows), rng.uniform(-0.05, 0.0, rows)
    sig.update({f"{name}.q4": (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8),
                f"{name}.scale": scale.astype(np.float32), f"{name}.offset": offset.astype(np.float32)})
    want[name] += alpha * (codes[:, :cols] * scale[:, None] + offset[:, None]).reshape(base[name].shape)
    for name in ("bn1.weight", "layer1.0.bn1.bias"):
        sig[name] = rng.normal(0, 0.1, base[name].shape).astype(np.float32)
        want[name] += alpha * sig[name]
    sig["bn1.running_var"] = rng.normal(0, 0.3, base["bn1.running_var"].shape).astype(np.float32)
    want["bn1.running_var"] *= np.exp(alpha * sig["bn1.running_var"].astype(np.float64))
    save_file(sig, str(d / "signatures" / "mix.rws.safetensors"))

    x = rng.normal(0, 1, (2, 1, 28, 28)).astype(np.float32)
    save_file({"input": x}, str(tmp / "in.safetensors"))
    run = [sys.executable, str(HERE / "numpy_reference.py"), "--model-dir", str(d)]
    got = np.array(json.loads(subprocess.run(run + ["--inputs", str(tmp / "in.safetensors"), "--patch", f"mix={alpha}"],
                                             check=True, capture_output=True, text=True).stdout)["logits"])
    sess = onnx_model(d, {k: v.astype(np.float32) for k, v in want.items()})
    err = compare(got, sess.run(None, {"input": x})[0])
    plain = np.array(json.loads(subprocess.run(run + ["--inputs", str(tmp / "in.safetensors")], check=True,
                                               capture_output=True, text=True).stdout)["logits"])
    moved = compare(plain, got)
    ok = err <= tol and moved > 10 * tol
    print(f"{'CLI --inputs --patch (q8, q4, f32, var)':40s}  28x28  rel. error {err:.1e}"
          f"  (unpatched differs by {moved:.1e}){'' if ok else '  FAIL'}")

    from PIL import Image  # --images: a 40x33 RGB image -> "L", resized whole to 28x28
    img = Image.fromarray(rng.integers(0, 256, (33, 40, 3), dtype=np.uint8))
    img.save(tmp / "img.png")
    out = json.loads(subprocess.run(run + ["--images", str(tmp / "img.png"), "--top", "2"], check=True,
                                    capture_output=True, text=True).stdout)["images"][0]
    px = np.asarray(img.convert("L").resize((28, 28), Image.BILINEAR), np.float64) / 255
    xi = ((px - 0.5) / 0.25)[None, None].astype(np.float32)
    err2 = compare(np.array(out["logits"]), onnx_model(d).run(None, {"input": xi})[0][0])
    top_ok = [t[0] for t in out["top"]] == list(np.argsort(-np.array(out["logits"]))[:2])
    ok &= err2 <= tol and top_ok
    print(f"{'CLI --images (RGB PNG -> L, resized)':40s}  28x28  rel. error {err2:.1e}{'' if ok else '  FAIL'}")
    return ok


def check_parameter_counts() -> bool:
    ok = True
    for (arch, classes), want in PARAMETERS.items():
        got = parameter_count(full_shapes(arch, classes))
        ok &= got == want
        print(f"{arch:20s} {got:>12,d} parameters at full width, {classes} classes"
              f"{'' if got == want else f'  FAIL: want {want:,d}'}")
    return ok


def compare_names(dirs) -> bool:
    ok = True
    for d in dirs:
        cfg = ref.load_config(d)
        from safetensors import safe_open

        with safe_open(str(d / "base.safetensors"), "np") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith("num_batches_tracked")
                    and not (cfg["arch"] == "vgg16-cifar" and k.startswith("normalize."))}
        want = full_shapes(cfg["arch"], len(cfg["labels"]), cfg["channels"], cfg)
        same = have == want
        ok &= same
        print(f"{str(d):40s} {len(have)} tensors: names and shapes {'match' if same else 'DIFFER'}")
        if not same:
            print("  only in the file:", sorted(set(have) - set(want))[:8])
            print("  only generated:  ", sorted(set(want) - set(have))[:8])
            print("  shapes differ:   ", [k for k in have if k in want and have[k] != want[k]][:8])
    return ok


def full(archs, tol, rng, tmp) -> bool:
    """Real widths at 224x224 (vgg16-cifar: 32x32), 2 images: error and time."""
    ok = True
    for arch in archs:
        size = (32, 32) if arch == "vgg16-cifar" else (224, 224)
        d = tmp / f"full-{arch}"
        classes = 10 if arch == "vgg16-cifar" else 1000
        write_model(d, arch, random_weights(full_shapes(arch, classes), rng), classes, 3, size)
        x = rng.normal(0, 1, (2, 3) + size).astype(np.float32)
        t = time.perf_counter()
        model = ref.Model(d)
        t1 = time.perf_counter()
        got = model.forward(x)
        t2 = time.perf_counter()
        sess = onnx_model(d)
        want = sess.run(None, {"input": x})[0]
        err = compare(got, want)
        ok &= err <= tol
        print(f"{arch:20s} 2 x {size[0]}x{size[1]}: rel. error {err:.1e}; numpy load {t1 - t:.1f} s, "
              f"forward {t2 - t1:.1f} s{'' if err <= tol else '  FAIL'}", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", nargs="+", metavar="ARCH", help="real widths at 224x224, timed, instead")
    ap.add_argument("--compare-names", nargs="+", type=Path, metavar="MODEL_DIR",
                    help="also compare these models' tensor names and shapes with the generated ones")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if a.full:
            checks = [lambda: full(a.full, a.tolerance, rng, tmp)]
        else:
            checks = [check_parameter_counts, lambda: run_cases(tmp, a.tolerance, rng),
                      lambda: check_cli(tmp, a.tolerance, rng)]
        if a.compare_names:
            checks.append(lambda: compare_names(a.compare_names))
        ok = True
        for check in checks:
            try:
                ok &= bool(check())
            except (Exception, SystemExit) as e:
                ok = False
                print(f"FAIL: {type(e).__name__}: {e}", getattr(e, "stderr", "") or "")
    print("check_numpy_reference: all checks passed" if ok else "check_numpy_reference: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
