#!/usr/bin/env python3
"""The onnxruntime baseline for `rws bench infer`: the same weights, the same
thread count, the same batch sizes.

Builds an ONNX graph of the model in MODEL_DIR (model.toml + base.safetensors,
torchvision tensor names) with the `onnx` package, then times onnxruntime.

    python3 -m venv .venv && .venv/bin/pip install numpy onnx onnxruntime safetensors
    .venv/bin/python benches/onnx_baseline.py models/mnist-resnet --threads 2 --batch 1,8

With `--profiles K`, it times the naive way to serve K robustness profiles with
onnxruntime instead: K full models (each its own copy of every weight, as K
fine-tuned models would be), one inference session each, and a stream of
`--stream` images whose profiles are spread evenly, each image run by its own
profile's session (batch 1), then the same stream cut into `--batch` runs of
consecutive images grouped by profile. It reports images/s and the weight bytes
the sessions hold (initializers, K times), and the process's resident memory
growth while the sessions were created.
"""
import argparse
import json
import statistics
import time
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file


def build(model_dir: Path, weights=None) -> tuple[onnx.ModelProto, dict]:
    """The graph of the model in `model_dir`, with its base.safetensors or `weights`
    (the same names) as initializers."""
    cfg = tomllib.loads((model_dir / "model.toml").read_text())
    if weights is None:
        weights = load_file(model_dir / "base.safetensors")
    w = {k: v.astype(np.float32) for k, v in weights.items()}
    eps = float(cfg.get("bn_eps", 1e-5))
    inits, nodes = [], []

    def init(name):
        inits.append(numpy_helper.from_array(w[name], name))
        return name

    def conv_bn(x, conv, bn, stride, pad, relu):
        k = w[f"{conv}.weight"].shape[2]
        y = f"{conv}.out"
        nodes.append(helper.make_node("Conv", [x, init(f"{conv}.weight")], [y],
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        z = f"{bn}.out"
        nodes.append(helper.make_node("BatchNormalization",
                                      [y] + [init(f"{bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")],
                                      [z], epsilon=eps))
        if relu:
            nodes.append(helper.make_node("Relu", [z], [z + ".relu"]))
            return z + ".relu"
        return z

    small = cfg["arch"] == "resnet-small"
    x = conv_bn("input", "conv1", "bn1", int(cfg.get("stem_stride", 1)) if small else 2, w["conv1.weight"].shape[2] // 2, True)
    if not small:
        nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
        x = "pool"
    bottleneck = "layer1.0.conv3.weight" in w
    stage = 1
    while f"layer{stage}.0.conv1.weight" in w:
        b = 0
        while f"layer{stage}.{b}.conv1.weight" in w:
            p = f"layer{stage}.{b}"
            stride = 2 if (b == 0 and stage > 1) else 1
            if bottleneck:
                h = conv_bn(x, f"{p}.conv1", f"{p}.bn1", 1, 0, True)
                h = conv_bn(h, f"{p}.conv2", f"{p}.bn2", stride, 1, True)
                h = conv_bn(h, f"{p}.conv3", f"{p}.bn3", 1, 0, False)
            else:
                h = conv_bn(x, f"{p}.conv1", f"{p}.bn1", stride, 1, True)
                h = conv_bn(h, f"{p}.conv2", f"{p}.bn2", 1, 1, False)
            ident = x
            if f"{p}.downsample.0.weight" in w:
                ident = conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", stride, 0, False)
            nodes.append(helper.make_node("Add", [h, ident], [p + ".add"]))
            nodes.append(helper.make_node("Relu", [p + ".add"], [p + ".out"]))
            x = p + ".out"
            b += 1
        stage += 1
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    nodes.append(helper.make_node("Gemm", ["flat", init("fc.weight"), init("fc.bias")], ["logits"], transB=1))
    h, wd = cfg["input_size"]
    graph = helper.make_graph(
        nodes, "rws", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", cfg["channels"], h, wd])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(cfg["labels"])])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, cfg


def median_seconds(run, iterations):
    """Median wall time of `iterations` calls of `run`, after one warm-up call."""
    run()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rss_bytes():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def profiles(a, model, cfg, so):
    """The naive alternative: one full model and session per profile."""
    rng = np.random.default_rng(7)
    base = rss_bytes()
    sessions, weight_bytes = [], 0
    for _ in range(a.profiles):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for init in m.graph.initializer:
            w = numpy_helper.to_array(init)
            # A fine-tuned copy: every weight its own (nothing shared between sessions).
            w = (w * (1 + 1e-3 * rng.standard_normal(w.shape))).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(w, init.name))
            weight_bytes += w.nbytes
        sessions.append(ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]))
    grown = rss_bytes() - base
    h, wd = cfg["input_size"]
    x = rng.uniform(-1, 1, (a.stream, cfg["channels"], h, wd)).astype(np.float32)
    which = np.arange(a.stream) % a.profiles
    rng.shuffle(which)
    batch = int(a.batch.split(",")[-1])

    def one_by_one():
        for i in range(a.stream):
            sessions[which[i]].run(None, {"input": x[i:i + 1]})

    def grouped():
        for start in range(0, a.stream, batch):
            idx = np.arange(start, min(start + batch, a.stream))
            for k in np.unique(which[idx]):
                sel = idx[which[idx] == k]
                sessions[k].run(None, {"input": x[sel]})

    out = []
    for name, run in (("batch 1, own session", one_by_one), (f"runs of {batch}, grouped by profile", grouped)):
        med = median_seconds(run, a.iterations)
        out.append({"model": a.model_dir.name, "profiles": a.profiles, "way": name, "images": a.stream,
                    "images_per_second": a.stream / med, "weight_bytes": weight_bytes, "rss_growth_bytes": grown})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profiles", type=int, default=0, help="time K full models, one session each (see above)")
    ap.add_argument("--stream", type=int, default=64, help="images in the --profiles stream")
    a = ap.parse_args()
    model, cfg = build(a.model_dir)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    if a.profiles:
        out = profiles(a, model, cfg, so)
        if a.json:
            print(json.dumps(out, indent=2))
        else:
            for r in out:
                print(f"onnxruntime {r['model']}, {r['profiles']} full models, {r['way']}: "
                      f"{r['images_per_second']:.1f} images/s; weights {r['weight_bytes'] / 2**20:.1f} MiB, "
                      f"RSS +{r['rss_growth_bytes'] / 2**20:.1f} MiB")
        return
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    h, wd = cfg["input_size"]
    out = []
    rng = np.random.default_rng(1)
    for b in [int(x) for x in a.batch.split(",")]:
        x = rng.uniform(-1, 1, (b, cfg["channels"], h, wd)).astype(np.float32)
        med = median_seconds(lambda: sess.run(None, {"input": x}), a.iterations)
        out.append({"model": a.model_dir.name, "batch": b, "median_ms": med * 1e3, "images_per_second": b / med})
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out:
            print(f"onnxruntime {r['model']} batch {r['batch']}: {r['images_per_second']:.1f} images/s (median {r['median_ms']:.2f} ms)")


if __name__ == "__main__":
    main()
