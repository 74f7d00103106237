#!/usr/bin/env python3
"""The onnxruntime baseline for `rws bench infer`: the same weights, the same
thread count, the same batch sizes.

Builds an ONNX graph of the model in MODEL_DIR (model.toml + base.safetensors,
torchvision / timm tensor names) with the `onnx` package, then times onnxruntime.
It covers every architecture rws serves: resnet18, resnet34, resnet50, resnet101,
resnet-small, vgg16, vgg16-bn, vgg16-cifar, mobilenet-v2 and efficientnet-lite0.
The graph keeps BatchNormalization unfolded and finds each network's blocks from
the tensor names; TensorFlow's "SAME" padding (efficientnet-lite0) is onnxruntime's
auto_pad SAME_UPPER. `build` is also the graph that tests/python/onnx_reference.py
and tests/python/check_numpy_reference.py compare against.

    python3 -m venv .venv && .venv/bin/pip install numpy onnx onnxruntime safetensors
    .venv/bin/python benches/onnx_baseline.py models/mnist-resnet --threads 2 --batch 1,8

With `--runtime openvino` (PyPI `openvino`), OpenVINO times the same graph instead,
read from memory and compiled for a fixed batch: `--threads` inference threads, the
LATENCY hint and f32 precision (without it, OpenVINO may run bf16 on CPUs that have it).

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


class Graph:
    """An ONNX graph under construction: nodes named by kind and number, and the
    weights `w` (torchvision / timm tensor names) added as initializers on use."""

    def __init__(self, w, eps):
        self.w, self.eps, self.nodes, self.inits, self.n = w, eps, [], {}, 0

    def init(self, name, value=None):
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.asarray(self.w[name] if value is None else value,
                                                                  np.float32), name)
        return name

    def op(self, kind, inputs, **attrs):
        self.n += 1
        out = f"{kind.lower()}{self.n}"
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def conv(self, x, name, stride=1, same=False, bias=False, depthwise=False):
        wt = self.w[f"{name}.weight"]
        k = wt.shape[2]
        pad = {"auto_pad": "SAME_UPPER"} if same else {"pads": [k // 2] * 4}
        ins = [x, self.init(f"{name}.weight")] + ([self.init(f"{name}.bias")] if bias else [])
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride],
                       group=wt.shape[0] if depthwise else 1, **pad)

    def bn(self, x, name):
        return self.op("BatchNormalization",
                       [x] + [self.init(f"{name}.{p}") for p in ("weight", "bias", "running_mean", "running_var")],
                       epsilon=self.eps)

    def relu(self, x):
        return self.op("Relu", [x])

    def relu6(self, x):
        return self.op("Clip", [x, self.init("zero", 0.0), self.init("six", 6.0)])

    def gemm(self, x, name):
        return self.op("Gemm", [x, self.init(f"{name}.weight"), self.init(f"{name}.bias")], transB=1)

    def gap(self, x):
        return self.op("Flatten", [self.op("GlobalAveragePool", [x])])

    def model(self, out, channels, size, classes):
        """The checked model: input "input" [N, channels, *size], and `out` (the last
        node's output) renamed "logits" [N, classes]."""
        assert list(self.nodes[-1].output) == [out]
        self.nodes[-1].output[0] = "logits"
        g = helper.make_graph(
            self.nodes, "rws",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, size[0], size[1]])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], list(self.inits.values()))
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(m)
        return m


def onnx_resnet(g, cfg):
    w, small = g.w, cfg["arch"] == "resnet-small"
    x = g.relu(g.bn(g.conv("input", "conv1", int(cfg.get("stem_stride", 1)) if small else 2), "bn1"))
    if not small:
        x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    s = 1
    while f"layer{s}.0.conv1.weight" in w:
        b = 0
        while f"layer{s}.{b}.conv1.weight" in w:
            q, stride = f"layer{s}.{b}", 2 if b == 0 and s > 1 else 1
            if f"{q}.conv3.weight" in w:
                h = g.relu(g.bn(g.conv(x, f"{q}.conv1"), f"{q}.bn1"))
                h = g.relu(g.bn(g.conv(h, f"{q}.conv2", stride), f"{q}.bn2"))
                h = g.bn(g.conv(h, f"{q}.conv3"), f"{q}.bn3")
            else:
                h = g.relu(g.bn(g.conv(x, f"{q}.conv1", stride), f"{q}.bn1"))
                h = g.bn(g.conv(h, f"{q}.conv2"), f"{q}.bn2")
            if f"{q}.downsample.0.weight" in w:
                x = g.bn(g.conv(x, f"{q}.downsample.0", stride), f"{q}.downsample.1")
            x = g.relu(g.op("Add", [h, x]))
            b += 1
        s += 1
    return g.gemm(g.gap(x), "fc")


def adaptive_table(n_in):
    """PyTorch AdaptiveAvgPool2d((7, 7)) along one axis as [7, n_in] weights, for
    the sizes vgg16 / vgg16-bn reach it at in practice (1, 2, 3, 7, 14), written
    out by hand."""
    rows = {1: [[0]] * 7,
            2: [[0], [0], [0], [0, 1], [1], [1], [1]],
            3: [[0], [0], [0, 1], [1], [1, 2], [2], [2]],
            7: [[i] for i in range(7)],
            14: [[2 * i, 2 * i + 1] for i in range(7)]}.get(n_in)
    if rows is None:
        raise ValueError(f"vgg: no adaptive-pool table for a {n_in}-wide feature map (have 1, 2, 3, 7, 14)")
    m = np.zeros((7, n_in))
    for i, r in enumerate(rows):
        m[i, r] = 1.0 / len(r)
    return m


def onnx_vgg(g, cfg, size):
    """A max-pool wherever the `features` numbering skips one index; vgg16-cifar has
    none after its last conv and ends in a global average pool and one Linear."""
    w, cifar = g.w, cfg["arch"] == "vgg16-cifar"
    convs = sorted(int(n.split(".")[1]) for n, v in w.items()
                   if n.startswith("features.") and n.endswith(".weight") and v.ndim == 4)
    use_bn = "features.1.running_var" in w
    x, (h, wd) = "input", size
    for a, i in enumerate(convs):
        x = g.conv(x, f"features.{i}", bias=True)
        if use_bn:
            x = g.bn(x, f"features.{i + 1}")
        x = g.relu(x)
        after = (convs[a + 1] if a + 1 < len(convs) else None)
        step = 3 if use_bn else 2
        if (after is not None and after - i > step) or (after is None and not cifar):
            x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
            h, wd = h // 2, wd // 2
    if cifar:
        return g.gemm(g.gap(x), "classifier")
    if (h, wd) == (14, 14):
        x = g.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    elif (h, wd) != (7, 7):  # x [N, C, h, wd] -> [N, C, 7, 7]: Th x Tw^t per channel
        th, tw = adaptive_table(h), adaptive_table(wd)
        x = g.op("MatMul", [g.op("MatMul", [g.init(f"pool{h}", th), x]), g.init(f"pool{wd}t", tw.T)])
    x = g.op("Flatten", [x])
    x = g.relu(g.gemm(x, "classifier.0"))
    x = g.relu(g.gemm(x, "classifier.3"))
    return g.gemm(x, "classifier.6")


def onnx_inverted(g, x, blocks, strides, same):
    """Inverted-residual blocks: blocks = [(convs, out_channels)], convs =
    [(conv, batchnorm, depthwise?, relu6?)]; the stride is the depthwise conv's,
    and the input is added back at stride 1 with equal channels."""
    for (convs, out_ch), stride in zip(blocks, strides):
        h = x
        for conv, bn_name, dw, act in convs:
            h = g.bn(g.conv(h, conv, stride if dw else 1, same=same, depthwise=dw), bn_name)
            if act:
                h = g.relu6(h)
        first = g.w[f"{convs[0][0]}.weight"]
        in_ch = first.shape[0] if convs[0][2] else first.shape[1]
        x = g.op("Add", [x, h]) if stride == 1 and in_ch == out_ch else h
    return x


def onnx_mobilenet_v2(g, cfg):
    w = g.w
    x = g.relu6(g.bn(g.conv("input", "features.0.0", 2), "features.0.1"))
    blocks, i = [], 1
    while f"features.{i}.conv.0.0.weight" in w:
        q = f"features.{i}.conv"
        if f"{q}.3.running_var" in w:  # expansion, depthwise, projection
            convs = [(f"{q}.0.0", f"{q}.0.1", False, True), (f"{q}.1.0", f"{q}.1.1", True, True),
                     (f"{q}.2", f"{q}.3", False, False)]
        else:
            convs = [(f"{q}.0.0", f"{q}.0.1", True, True), (f"{q}.1", f"{q}.2", False, False)]
        blocks.append((convs, w[f"{convs[-1][0]}.weight"].shape[0]))
        i += 1
    strides = [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    x = onnx_inverted(g, x, blocks, strides, same=False)
    x = g.relu6(g.bn(g.conv(x, f"features.{i}.0"), f"features.{i}.1"))
    return g.gemm(g.gap(x), "classifier.1")


def onnx_efficientnet_lite0(g, cfg):
    w = g.w
    x = g.relu6(g.bn(g.conv("input", "conv_stem", 2, same=True), "bn1"))
    blocks, strides, s = [], [], 0
    while f"blocks.{s}.0.conv_dw.weight" in w:
        b = 0
        while f"blocks.{s}.{b}.conv_dw.weight" in w:
            q = f"blocks.{s}.{b}"
            if f"{q}.conv_pwl.weight" in w:
                convs = [(f"{q}.conv_pw", f"{q}.bn1", False, True), (f"{q}.conv_dw", f"{q}.bn2", True, True),
                         (f"{q}.conv_pwl", f"{q}.bn3", False, False)]
            else:
                convs = [(f"{q}.conv_dw", f"{q}.bn1", True, True), (f"{q}.conv_pw", f"{q}.bn2", False, False)]
            blocks.append((convs, w[f"{convs[-1][0]}.weight"].shape[0]))
            strides.append([1, 2, 2, 2, 1, 2, 1][s] if b == 0 else 1)
            b += 1
        s += 1
    x = onnx_inverted(g, x, blocks, strides, same=True)
    x = g.relu6(g.bn(g.conv(x, "conv_head", same=True), "bn2"))
    return g.gemm(g.gap(x), "classifier")


def build(model_dir: Path, weights=None) -> tuple[onnx.ModelProto, dict]:
    """The graph of the model in `model_dir`, with its base.safetensors or `weights`
    (the same names) as initializers (float32; only the tensors the network reads)."""
    cfg = tomllib.loads((model_dir / "model.toml").read_text())
    if weights is None:
        weights = load_file(str(model_dir / "base.safetensors"))
    g = Graph(weights, float(cfg.get("bn_eps", 1e-5)))
    arch, size = cfg["arch"], cfg["input_size"]
    if arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet-small"):
        out = onnx_resnet(g, cfg)
    elif arch in ("vgg16", "vgg16-bn", "vgg16-cifar"):
        out = onnx_vgg(g, cfg, size)
    elif arch == "mobilenet-v2":
        out = onnx_mobilenet_v2(g, cfg)
    elif arch == "efficientnet-lite0":
        out = onnx_efficientnet_lite0(g, cfg)
    else:
        raise ValueError(f"{model_dir}: no ONNX graph for arch {arch!r}")
    return g.model(out, cfg["channels"], size, len(cfg["labels"])), cfg


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
            if "." in init.name:  # not the graph's own constants (relu6 bounds, vgg pool tables)
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
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"])
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
    h, wd = cfg["input_size"]
    out = []
    rng = np.random.default_rng(1)
    for b in [int(x) for x in a.batch.split(",")]:
        x = rng.uniform(-1, 1, (b, cfg["channels"], h, wd)).astype(np.float32)
        run = (openvino_runner(model, b, a.threads) if a.runtime == "openvino"
               else onnxruntime_runner(model, so))
        med = median_seconds(lambda: run(x), a.iterations)
        out.append({"runtime": a.runtime, "model": a.model_dir.name, "batch": b, "median_ms": med * 1e3,
                    "images_per_second": b / med})
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out:
            print(f"{r['runtime']} {r['model']} batch {r['batch']}: {r['images_per_second']:.1f} images/s "
                  f"(median {r['median_ms']:.2f} ms)")


def onnxruntime_runner(model, so):
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": x})


def openvino_runner(model, batch, threads):
    import openvino as ov

    core = ov.Core()
    m = core.read_model(model.SerializeToString(), b"")
    m.reshape({"input": [batch, *m.input("input").get_partial_shape()[1:].to_shape()]})
    compiled = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                             "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda x: request.infer({"input": x})


if __name__ == "__main__":
    main()
