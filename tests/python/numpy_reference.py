#!/usr/bin/env python3
"""An independent NumPy forward pass of every architecture rws serves, to check
rws's logits against. NumPy only (Pillow decodes and resizes images), float64
throughout; it shares no code with rws and is written from the torchvision, timm
and RWS-paper definitions of the networks, not from src/model/arch.rs.

    numpy_reference.py --model-dir DIR --inputs IN.safetensors [--patch NAME=ALPHA ...]
        IN.safetensors holds `input`, f32 [N, C, H, W], already normalised.
        Prints {"logits": [[...], ...]}, one row per image.
    numpy_reference.py --model-dir DIR --images IMG... [--top K] [--patch ...]
        Prints {"images": [{"path", "logits", "top": [[index, label, probability]]}]}.
    numpy_reference.py --model-dir DIR --foolbox data/imagenet/foolbox [--patch ...]
        Top-1 over DIR/labels.json (file name -> class index).

DIR holds model.toml (`arch`, `input_size`, `channels`, `mean`, `std`, `labels`,
optional `resize`, `bn_eps` (default 1e-5), and for resnet-small `widths`,
`depths`, `stem_stride`) and base.safetensors. `--patch NAME=ALPHA` (repeatable)
applies DIR/signatures/NAME.rws.safetensors at ALPHA first (tests/python/
signatures.py). Every tensor of base.safetensors must be read by the network, and
every tensor the network reads must exist, so a naming mismatch is an error.

The networks (inference mode: BatchNorm is (x - running_mean) / sqrt(running_var
+ eps) * weight + bias; dropout is the identity):
  resnet18/34/50/101   torchvision: conv1 7x7/2 (pad 3), bn1, ReLU, max-pool 3x3/2
      (pad 1), layer1..layer4 of BasicBlocks (18, 34: [2,2,2,2], [3,4,6,3]) or
      Bottlenecks (50, 101: [3,4,6,3], [3,4,23,3]; the stride on the 3x3 conv2),
      the first block of layer2..4 with stride 2, `downsample` (1x1 conv with the
      block's stride, BN) where the stride is not 1 or the channels change, ReLU
      after the sum; global average pool; `fc`.
  resnet-small   conv1 3x3 with stride `stem_stride` (pad 1), bn1, ReLU, no
      max-pool, then BasicBlock stages of `widths` x `depths` as above; `fc`.
  vgg16, vgg16-bn   torchvision: `features` of 3x3 convs (pad 1, with bias), each
      followed by (BatchNorm and) ReLU, 2x2/2 max-pools after the 2nd, 4th, 7th,
      10th and 13th; AdaptiveAvgPool2d((7, 7)); flatten (channel-major);
      classifier.0, ReLU, classifier.3, ReLU, classifier.6.
  vgg16-cifar   the network of the RWS paper's code (VITA-Group/Robust_Weight_Signatures
      models/vgg.py, `vgg16`): vgg16's `features` without BatchNorm and without the
      max-pool after the last conv (32x32 -> 2x2), a global average pool, then one
      Linear `classifier` (512 -> classes). Its checkpoints also hold
      `normalize.mean`/`normalize.std`, which are not read (model.toml's mean and std
      do that job).
  mobilenet-v2   torchvision, width 1.0: features.0 conv 3x3/2 + BN + ReLU6;
      features.1..17 inverted residuals (t, c, n, s) = (1,16,1,1) (6,24,2,2)
      (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1): 1x1 expansion
      (unless t = 1), 3x3 depthwise with the stride, linear 1x1 projection, the
      input added when the stride is 1 and the channels are unchanged;
      features.18 1x1 conv to 1280 + BN + ReLU6; global average pool; classifier.1.
  efficientnet-lite0   timm names, TensorFlow "SAME" padding (ceil(in / stride)
      outputs, the odd zero of an uneven total after), ReLU6, no squeeze-excite:
      conv_stem 3x3/2, bn1; stage 0 a depthwise-separable block (dw 3x3, bn1,
      ReLU6, pw 1x1, bn2); stages 1..6 inverted residuals (conv_pw, bn1, ReLU6,
      conv_dw, bn2, ReLU6, conv_pwl, bn3), kernel/stride/repeats (3,2,2) (5,2,2)
      (3,2,3) (5,1,3) (5,2,4) (3,1,1), the input added when the stride is 1 and
      the channels are unchanged; conv_head 1x1, bn2, ReLU6; global average pool;
      classifier.

Arithmetic: float64 throughout, convolutions as im2col + float64 matmul (no
float32 anywhere after loading); weights are read as stored (float32), patched in
float32 (tests/python/signatures.py), then widened.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------
# Model files


def load_config(model_dir: Path) -> dict:
    with open(model_dir / "model.toml", "rb") as f:
        return tomllib.load(f)


def load_weights(model_dir: Path, patches=()) -> dict:
    """base.safetensors as float64, with each (signature, alpha) of `patches`
    applied (in float32, from DIR/signatures) first."""
    from safetensors.numpy import load_file

    base = load_file(str(model_dir / "base.safetensors"))
    if patches:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from signatures import patched

        base = patched(base, model_dir / "signatures", list(patches))
    return {k: np.asarray(v, np.float64) for k, v in base.items()}


class MissingTensor(KeyError):
    pass


class Weights:
    """The weights, remembering which were read, so that tensors the network
    never reads (a naming mismatch) can be reported."""

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.read = set()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise MissingTensor(f"base.safetensors has no tensor {name!r}")
        self.read.add(name)
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def unread(self, ignore=()) -> list[str]:
        return sorted(k for k in self.tensors
                      if k not in self.read and not k.endswith("num_batches_tracked")
                      and not any(k.startswith(p) for p in ignore))


# --------------------------------------------------------------------------------
# Preprocessing


def preprocess(path, cfg) -> np.ndarray:
    """Image file -> [C, H, W] float64, the way the model expects it: grayscale
    ("L") for 1 channel, else RGB. With cfg.resize: the shorter side resized to it
    (Pillow bilinear, the longer side to floor(long * resize / short)) and the
    centre cropped to cfg.input_size (left = (w - crop_w) // 2, top = (h - crop_h)
    // 2). Without: the whole image resized to input_size (bilinear) when its size
    differs. Then pixels / 255 and (x - mean) / std per channel."""
    img = Image.open(path).convert("L" if cfg["channels"] == 1 else "RGB")
    ch, cw = cfg["input_size"]
    w, h = img.size
    if "resize" in cfg:
        r = int(cfg["resize"])
        if w <= h:
            nw, nh = r, int(h * r / w)
        else:
            nw, nh = int(w * r / h), r
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - cw) // 2, (nh - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    elif (w, h) != (cw, ch):
        img = img.resize((cw, ch), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float64).reshape(ch, cw, cfg["channels"]) / 255.0
    x = (x - np.array(cfg["mean"], np.float64)) / np.array(cfg["std"], np.float64)
    return x.transpose(2, 0, 1)


# --------------------------------------------------------------------------------
# Layers, on [N, C, H, W] float64


def same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow "SAME": ceil(size / s) outputs; the odd zero goes after."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def conv2d(x, w, stride=1, padding="torch", bias=None):
    """Convolution of x [N, C, H, W] with w [O, C / groups, k, k], where groups is
    1 (dense) or C = O (depthwise). padding "torch" pads k // 2 on every side,
    "same" is TensorFlow's."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    if padding == "same":
        (t, b), (l, r) = same_pads(h, k, stride), same_pads(wd, k, stride)
    else:
        t = b = l = r = k // 2
    if t or b or l or r:
        x = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    oh = (x.shape[2] - k) // stride + 1
    ow = (x.shape[3] - k) // stride + 1

    def tap(i, j):  # the input under kernel tap (i, j), [N, C, oh, ow]
        return x[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]

    if cg == 1 and c == o and c > 1:  # depthwise
        out = np.zeros((n, c, oh, ow))
        for i in range(k):
            for j in range(k):
                out += w[None, :, 0, i, j, None, None] * tap(i, j)
    elif cg == c:  # dense: im2col, one image at a time
        wm = w.reshape(o, c * k * k)
        out = np.empty((n, o, oh * ow))
        for m in range(n):
            if k == 1:
                cols = tap(0, 0)[m].reshape(c, oh * ow)
            else:
                cols = np.empty((c, k, k, oh, ow))
                for i in range(k):
                    for j in range(k):
                        cols[:, i, j] = tap(i, j)[m]
                cols = cols.reshape(c * k * k, oh * ow)
            out[m] = wm @ cols
        out = out.reshape(n, o, oh, ow)
    else:
        raise ValueError(f"conv weight {w.shape} on {c} channels: neither dense nor depthwise")
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def batchnorm(x, p, name, eps):
    scale = p[f"{name}.weight"] / np.sqrt(p[f"{name}.running_var"] + eps)
    shift = p[f"{name}.bias"] - p[f"{name}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def relu(x):
    return np.maximum(x, 0.0)


def relu6(x):
    return np.clip(x, 0.0, 6.0)


def max_pool(x, k, s, pad=0):
    """PyTorch MaxPool2d (floor mode): padding counts as -inf."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    oh = (x.shape[2] - k) // s + 1
    ow = (x.shape[3] - k) // s + 1
    out = np.full(x.shape[:2] + (oh, ow), -np.inf)
    for i in range(k):
        for j in range(k):
            np.maximum(out, x[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s], out=out)
    return out


def adaptive_avg_pool(x, size):
    """PyTorch AdaptiveAvgPool2d(size): output cell i averages input rows
    floor(i * in / out) .. ceil((i + 1) * in / out) - 1 (likewise columns)."""

    def matrix(n_in, n_out):
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m

    mh, mw = matrix(x.shape[2], size[0]), matrix(x.shape[3], size[1])
    return np.einsum("ih,nchw,jw->ncij", mh, x, mw)


def linear(x, p, name):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def global_avg(x):
    return x.mean(axis=(2, 3))


# --------------------------------------------------------------------------------
# Networks: x [N, C, H, W] -> logits [N, classes]


def resnet(x, p, cfg, eps):
    arch = cfg["arch"]
    if arch == "resnet-small":
        bottleneck, depths = False, list(cfg["depths"])
        x = relu(batchnorm(conv2d(x, p["conv1.weight"], int(cfg.get("stem_stride", 1))), p, "bn1", eps))
    else:
        bottleneck, depths = {"resnet18": (False, [2, 2, 2, 2]), "resnet34": (False, [3, 4, 6, 3]),
                              "resnet50": (True, [3, 4, 6, 3]), "resnet101": (True, [3, 4, 23, 3])}[arch]
        x = relu(batchnorm(conv2d(x, p["conv1.weight"], 2), p, "bn1", eps))
        x = max_pool(x, 3, 2, pad=1)
    for stage, depth in enumerate(depths):
        for b in range(depth):
            q = f"layer{stage + 1}.{b}"
            stride = 2 if b == 0 and stage > 0 else 1
            if arch == "resnet-small" and b == 0:
                want = int(cfg["widths"][stage])
                got = p[f"{q}.conv1.weight"].shape[0]
                if got != want:
                    raise ValueError(f"{q}.conv1 has {got} channels; model.toml widths say {want}")
            if bottleneck:
                h = relu(batchnorm(conv2d(x, p[f"{q}.conv1.weight"]), p, f"{q}.bn1", eps))
                h = relu(batchnorm(conv2d(h, p[f"{q}.conv2.weight"], stride), p, f"{q}.bn2", eps))
                h = batchnorm(conv2d(h, p[f"{q}.conv3.weight"]), p, f"{q}.bn3", eps)
            else:
                h = relu(batchnorm(conv2d(x, p[f"{q}.conv1.weight"], stride), p, f"{q}.bn1", eps))
                h = batchnorm(conv2d(h, p[f"{q}.conv2.weight"]), p, f"{q}.bn2", eps)
            if stride != 1 or h.shape[1] != x.shape[1]:
                x = batchnorm(conv2d(x, p[f"{q}.downsample.0.weight"], stride), p, f"{q}.downsample.1", eps)
            x = relu(h + x)
    return linear(global_avg(x), p, "fc")


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg_features(x, p, eps, bn, last_pool=True):
    """torchvision's make_layers numbering: conv, (BN,) ReLU per conv; one index
    per max-pool. The widths are the weights' (VGG-16's 64 ... 512 in real models)."""
    layers = VGG16_CFG if last_pool else VGG16_CFG[:-1]
    i = 0
    for v in layers:
        if v == "M":
            x = max_pool(x, 2, 2)
            i += 1
            continue
        x = conv2d(x, p[f"features.{i}.weight"], 1, bias=p[f"features.{i}.bias"])
        if bn:
            x = batchnorm(x, p, f"features.{i + 1}", eps)
        x = relu(x)
        i += 3 if bn else 2
    return x


def vgg(x, p, cfg, eps):
    arch = cfg["arch"]
    if arch == "vgg16-cifar":
        x = vgg_features(x, p, eps, bn=False, last_pool=False)
        return linear(global_avg(x), p, "classifier")
    x = vgg_features(x, p, eps, bn=arch == "vgg16-bn")
    x = adaptive_avg_pool(x, (7, 7)).reshape(x.shape[0], -1)
    x = relu(linear(x, p, "classifier.0"))
    x = relu(linear(x, p, "classifier.3"))
    return linear(x, p, "classifier.6")


MOBILENET_V2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(x, p, cfg, eps):
    def cna(x, name, stride=1):  # torchvision's Conv2dNormActivation: conv, BN, ReLU6
        return relu6(batchnorm(conv2d(x, p[f"{name}.0.weight"], stride), p, f"{name}.1", eps))

    x = cna(x, "features.0", 2)
    idx = 1
    for t, _c, n, s in MOBILENET_V2_SETTINGS:
        for r in range(n):
            q = f"features.{idx}.conv"
            stride = s if r == 0 else 1
            h, j = x, 0
            if t != 1:
                h, j = cna(h, f"{q}.0"), 1
            h = cna(h, f"{q}.{j}", stride)
            h = batchnorm(conv2d(h, p[f"{q}.{j + 1}.weight"]), p, f"{q}.{j + 2}", eps)
            x = x + h if stride == 1 and h.shape[1] == x.shape[1] else h
            idx += 1
    x = cna(x, f"features.{idx}")
    return linear(global_avg(x), p, "classifier.1")


# (block kind, kernel, stride of the first block, repeats) per stage
EFFICIENTNET_LITE0_STAGES = [("ds", 3, 1, 1), ("ir", 3, 2, 2), ("ir", 5, 2, 2), ("ir", 3, 2, 3),
                             ("ir", 5, 1, 3), ("ir", 5, 2, 4), ("ir", 3, 1, 1)]


def efficientnet_lite0(x, p, cfg, eps):
    def cbn(x, conv, bn, stride=1, act=True, kernel=None):
        w = p[f"{conv}.weight"]
        if kernel is not None and w.shape[2] != kernel:
            raise ValueError(f"{conv}.weight is {w.shape[2]}x{w.shape[3]}; EfficientNet-Lite0 has {kernel}x{kernel}")
        y = batchnorm(conv2d(x, w, stride, "same"), p, bn, eps)
        return relu6(y) if act else y

    x = cbn(x, "conv_stem", "bn1", 2, kernel=3)
    for s, (kind, k, first_stride, repeats) in enumerate(EFFICIENTNET_LITE0_STAGES):
        for i in range(repeats):
            q = f"blocks.{s}.{i}"
            stride = first_stride if i == 0 else 1
            if kind == "ds":
                h = cbn(x, f"{q}.conv_dw", f"{q}.bn1", stride, kernel=k)
                h = cbn(h, f"{q}.conv_pw", f"{q}.bn2", act=False)
            else:
                h = cbn(x, f"{q}.conv_pw", f"{q}.bn1")
                h = cbn(h, f"{q}.conv_dw", f"{q}.bn2", stride, kernel=k)
                h = cbn(h, f"{q}.conv_pwl", f"{q}.bn3", act=False)
            x = x + h if stride == 1 and h.shape[1] == x.shape[1] else h
    x = cbn(x, "conv_head", "bn2")
    return linear(global_avg(x), p, "classifier")


NETWORKS = {
    "resnet18": resnet, "resnet34": resnet, "resnet50": resnet, "resnet101": resnet,
    "resnet-small": resnet,
    "vgg16": vgg, "vgg16-bn": vgg, "vgg16-cifar": vgg,
    "mobilenet-v2": mobilenet_v2,
    "efficientnet-lite0": efficientnet_lite0,
}


class Model:
    def __init__(self, model_dir: Path, patches=()):
        self.cfg = load_config(model_dir)
        arch = self.cfg["arch"]
        if arch not in NETWORKS:
            raise SystemExit(f"{model_dir}/model.toml: unknown arch {arch!r}; known: {', '.join(NETWORKS)}")
        self.eps = float(self.cfg.get("bn_eps", 1e-5))
        self.weights = Weights(load_weights(model_dir, patches))
        self.checked = False

    def forward(self, x: np.ndarray, chunk: int = 8) -> np.ndarray:
        """[N, C, H, W] (normalised) -> [N, classes] float64 logits."""
        x = np.asarray(x, np.float64)
        if x.ndim != 4 or x.shape[1] != self.cfg["channels"]:
            raise SystemExit(f"input shape {x.shape}; expected [N, {self.cfg['channels']}, H, W]")
        net = NETWORKS[self.cfg["arch"]]
        out = [net(x[i:i + chunk], self.weights, self.cfg, self.eps) for i in range(0, len(x), chunk)]
        if not self.checked and len(x):
            ignore = ("normalize.",) if self.cfg["arch"] == "vgg16-cifar" else ()
            unread = self.weights.unread(ignore)
            if unread:
                raise SystemExit(f"base.safetensors has {len(unread)} tensors the {self.cfg['arch']} network "
                                 f"does not read: {', '.join(unread[:8])}{' ...' if len(unread) > 8 else ''}")
            self.checked = True
        return np.concatenate(out) if out else np.zeros((0, len(self.cfg["labels"])))


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# --------------------------------------------------------------------------------
# Command line


def parse_patch(text: str) -> tuple[str, float]:
    name, sep, alpha = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--patch {text!r}: expected NAME=ALPHA")
    try:
        return name, float(alpha)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--patch {text!r}: ALPHA is not a number") from None


def print_rows(key: str, rows: list, **extra) -> None:
    """JSON {key: rows, **extra}, one row per line."""
    body = ",\n ".join(json.dumps(r) for r in rows)
    tail = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items())
    print(f"{{{json.dumps(key)}: [\n {body}\n]{tail}}}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model-dir", type=Path, required=True)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--inputs", type=Path, help="safetensors file with `input`, f32 [N, C, H, W], normalised")
    what.add_argument("--images", type=Path, nargs="+", help="image files, preprocessed as model.toml says")
    what.add_argument("--foolbox", type=Path, help="directory with labels.json: top-1 over its images")
    ap.add_argument("--patch", type=parse_patch, action="append", default=[], metavar="NAME=ALPHA",
                    help="apply MODEL_DIR/signatures/NAME.rws.safetensors at ALPHA (repeatable)")
    ap.add_argument("--top", type=int, default=5, help="classes listed per image with --images")
    a = ap.parse_args(argv)

    try:
        run(a)
    except MissingTensor as e:
        raise SystemExit(f"{a.model_dir}: {e.args[0]}") from None
    return 0


def run(a) -> None:
    model = Model(a.model_dir, a.patch)
    cfg = model.cfg
    labels = cfg["labels"]
    if a.inputs is not None:
        from safetensors.numpy import load_file

        x = load_file(str(a.inputs))["input"]
        print_rows("logits", model.forward(x).tolist())
    elif a.images is not None:
        z = model.forward(np.stack([preprocess(path, cfg) for path in a.images]))
        out = []
        for path, row in zip(a.images, z):
            prob = softmax(row)
            top = np.argsort(-row, kind="stable")[:a.top]
            out.append({"path": str(path), "logits": row.tolist(),
                        "top": [[int(i), labels[i], float(prob[i])] for i in top]})
        print_rows("images", out)
    else:
        truth = json.loads((a.foolbox / "labels.json").read_text())
        names = sorted(truth)
        z = model.forward(np.stack([preprocess(a.foolbox / n, cfg) for n in names]))
        rows, correct = [], 0
        for name, row in zip(names, z):
            pred, label = int(np.argmax(row)), int(truth[name])
            correct += pred == label
            rows.append({"file": name, "label": label, "label_name": labels[label],
                         "predicted": pred, "predicted_name": labels[pred], "correct": pred == label})
        print_rows("images", rows, correct=correct, total=len(names))


if __name__ == "__main__":
    sys.exit(main())
