"""rws signature files applied to base weights in NumPy, from the format as
src/patch/signature.rs documents it, sharing no code with rws: q8 and q4 rows are
dequantised as code * scale + offset, a running variance is scaled by
exp(alpha * delta), and every other delta is added as alpha * delta.

Used by tests/python/onnx_reference.py and tests/python/numpy_reference.py.
"""

import numpy as np
from safetensors import safe_open


def dequantise(f, name, shape):
    """The delta for base tensor `name` in signature file `f`, or None."""
    keys = set(f.keys())
    if name in keys:
        return f.get_tensor(name).astype(np.float32).reshape(shape)
    rows = shape[0]
    cols = int(np.prod(shape)) // rows
    if f"{name}.q8" in keys:
        codes = f.get_tensor(f"{name}.q8").reshape(rows, cols).astype(np.float32)
    elif f"{name}.q4" in keys:
        packed = f.get_tensor(f"{name}.q4").reshape(rows, -1)
        codes = np.empty((rows, packed.shape[1] * 2), np.float32)
        codes[:, 0::2] = packed & 0x0F
        codes[:, 1::2] = packed >> 4
        codes = codes[:, :cols]
    else:
        return None
    scale = f.get_tensor(f"{name}.scale").astype(np.float32)[:, None]
    offset = f.get_tensor(f"{name}.offset").astype(np.float32)[:, None]
    return (codes * scale + offset).reshape(shape)


def patched(base, sig_dir, refs):
    """base.safetensors with each (signature, alpha) of `refs` applied; the
    signature NAME is read from sig_dir/NAME.rws.safetensors."""
    w = {k: v.copy() for k, v in base.items()}
    for name, alpha in refs:
        with safe_open(sig_dir / f"{name}.rws.safetensors", "np") as f:
            for t in base:
                d = dequantise(f, t, base[t].shape)
                if d is None:
                    continue
                if t.endswith(".running_var"):
                    w[t] = w[t] * np.exp(alpha * d)
                else:
                    w[t] = w[t] + alpha * d
    return w
