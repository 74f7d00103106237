#!/usr/bin/env python3
"""The PyTorch eager baseline for `rws bench infer --device cuda:0`: the same weights
(MODEL_DIR's base.safetensors, loaded into torchvision's ResNet with strict names and
shapes), the same batch sizes, the same timing (input already on the GPU; one forward
plus the logits copied to the host, median of ITERATIONS after a warm-up).

Modes, each timed at every batch size:
  fp32         cuDNN, TF32 off: the same arithmetic as rws (which keeps fp32 exact);
  fp32-native  cuDNN off: PyTorch's own im2col + cuBLAS convolutions, the path closest
               to candle's, to show how much of a gap is the convolution library;
  tf32         PyTorch's defaults (cuDNN may use TF32 tensor cores for convolutions);
  fp16         the weights and input in half precision (what a reduced-precision
               rws would race against).

With --image PNG --rws-logits JSON it also checks the served logits: the PNG must be
the model's input size, so that rws only normalizes it, `(v / 255 - mean) / std` in
float32, which this script repeats; the logits `rws classify --json` printed must
match PyTorch's fp32 logits within 1e-3 relative (max |diff| / max |value|).

Usage: torch_baseline.py MODEL_DIR [--batch 1,8,32] [--iterations 50] [--json FILE]
                         [--image PNG --rws-logits JSON]
"""

import argparse
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors.torch import load_file

LOGITS_TOLERANCE = 1e-3


def build(model_dir: Path) -> tuple[torch.nn.Module, dict]:
    cfg = tomllib.loads((model_dir / "model.toml").read_text())
    arch = cfg["arch"]
    if not hasattr(torchvision.models, arch) or not arch.startswith("resnet"):
        sys.exit(f"{model_dir}: arch {arch!r} has no torchvision equivalent")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=len(cfg["labels"]))
    eps = float(cfg.get("bn_eps", 1e-5))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = eps
    missing, unexpected = model.load_state_dict(load_file(model_dir / "base.safetensors"), strict=False)
    # torchvision keeps a step counter per BatchNorm that inference never reads.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        sys.exit(f"weights do not fit torchvision's {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg


def set_mode(mode: str) -> torch.dtype:
    torch.backends.cudnn.enabled = mode != "fp32-native"
    torch.backends.cudnn.benchmark = mode != "fp32-native"
    tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.float16 if mode == "fp16" else torch.float32


@torch.inference_mode()
def time_mode(model, cfg, mode: str, batches: list[int], iterations: int) -> list[dict]:
    dtype = set_mode(mode)
    m = model.to("cuda", dtype)
    h, w = cfg["input_size"]
    rng = np.random.default_rng(1)
    out = []
    for b in batches:
        x = torch.from_numpy(rng.uniform(-1, 1, (b, cfg["channels"], h, w)).astype(np.float32))
        x = x.to("cuda", dtype)
        for _ in range(3):  # warm-up: cuDNN autotuning, lazy kernel loads
            m(x).float().cpu()
        times = []
        for _ in range(iterations):
            t = time.perf_counter()
            m(x).float().cpu()
            times.append(time.perf_counter() - t)
        p50 = statistics.median(times)
        out.append({
            "mode": mode,
            "batch": b,
            "iterations": iterations,
            "p50_ms": p50 * 1e3,
            "p99_ms": sorted(times)[round((len(times) - 1) * 0.99)] * 1e3,
            "images_per_second": b / p50,
        })
        print(f"torch {mode:<11} batch {b:>3}: {b / p50:8.1f} images/s (p50 {p50 * 1e3:.2f} ms)", flush=True)
    return out


@torch.inference_mode()
def check_logits(model, cfg, image: Path, rws_logits: Path) -> dict:
    from PIL import Image

    set_mode("fp32")
    m = model.to("cuda", torch.float32)
    img = np.asarray(Image.open(image).convert("RGB" if cfg["channels"] == 3 else "L"), dtype=np.uint8)
    h, w = cfg["input_size"]
    if img.shape[:2] != (h, w):
        sys.exit(f"{image} is {img.shape[1]}x{img.shape[0]}; the check needs the model's {w}x{h}")
    img = img.reshape(h, w, -1).transpose(2, 0, 1).astype(np.float32)
    mean = np.asarray(cfg["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(cfg["std"], np.float32).reshape(-1, 1, 1)
    x = (img / np.float32(255.0) - mean) / std
    want = m(torch.from_numpy(x[None]).cuda()).cpu().numpy().ravel()
    got = np.asarray(json.loads(rws_logits.read_text())["logits"], np.float32)
    if got.shape != want.shape:
        sys.exit(f"rws gave {got.shape[0]} logits, torch {want.shape[0]}")
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    same_top1 = int(got.argmax()) == int(want.argmax())
    passed = err <= LOGITS_TOLERANCE and same_top1
    print(f"served logits vs torch fp32: max rel err {err:.2e}, same top-1: {same_top1} "
          f"({'ok' if passed else 'FAIL'})", flush=True)
    return {"max_rel_err": err, "same_top1": same_top1, "passed": passed}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--modes", default="fp32,fp32-native,tf32,fp16")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--rws-logits", type=Path)
    a = ap.parse_args()
    model, cfg = build(a.model_dir)
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    print(f"{report['device']}: torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}", flush=True)
    ok = True
    if a.image and a.rws_logits:
        report["logits"] = check_logits(model, cfg, a.image, a.rws_logits)
        ok = report["logits"]["passed"]
    batches = [int(b) for b in a.batch.split(",")]
    report["infer"] = [r for mode in a.modes.split(",") if mode
                       for r in time_mode(model, cfg, mode, batches, a.iterations)]
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
