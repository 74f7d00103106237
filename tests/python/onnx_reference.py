"""Accuracy through the serving path, checked against an independent reference.

Sends every PNG in --images to a running rws server over gRPC (rws.v1) under
several profiles, and compares the logits that come back with those of the
ONNX graph that benches/onnx_baseline.py builds, run by onnxruntime. Nothing
here shares code with rws: the PNG is decoded by Pillow and normalised with
NumPy, and a profile's weights are made by applying its signature files to
base.safetensors in NumPy, from the format described in src/patch/signature.rs
(q8/q4 rows dequantised as code * scale + offset, running_var scaled by
exp(alpha * delta), everything else added as alpha * delta). The server folds
BatchNorm into the convolutions and runs its own kernels; the graph does not.

Image files are named KIND_INDEX_LABEL.png. Each is classified under `clean`,
under the profile named KIND when the server has one, and under `auto` (whose
answer names the signatures it chose, which the reference then applies). A
profile of several signatures at non-default alphas is also defined with
PutProfile and used on every image.

Prints a JSON report; "passed" is true when every answer's logits match the
reference within --tolerance (max |difference| / max(1, max |logit|)) and the
top classes agree wherever the reference's top two are further apart than that.
"""

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benches"))
from onnx_baseline import build  # noqa: E402
from rws.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc  # noqa: E402
from numpy_reference import preprocess  # noqa: E402
from signatures import patched  # noqa: E402

MIX = "onnx-reference-mix"


class Reference:
    """One onnxruntime session per distinct list of signatures@alpha."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.base = {k: v.astype(np.float32) for k, v in load_file(model_dir / "base.safetensors").items()}
        self.sessions = {}
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.so = so

    def logits(self, refs, x):
        key = tuple(sorted(refs))
        if key not in self.sessions:
            weights = patched(self.base, self.model_dir / "signatures", key)
            model, _ = build(self.model_dir, weights)
            self.sessions[key] = ort.InferenceSession(model.SerializeToString(), self.so,
                                                      providers=["CPUExecutionProvider"])
        return self.sessions[key].run(None, {"input": x})[0][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    a = ap.parse_args()
    cfg = tomllib.loads((a.model_dir / "model.toml").read_text())
    ref = Reference(a.model_dir)

    channel = grpc.insecure_channel(a.addr)
    infer = inference_pb2_grpc.InferenceStub(channel)
    admin = admin_pb2_grpc.AdminStub(channel)
    listed = admin.ListProfiles(admin_pb2.ListProfilesRequest()).profiles
    table = {p.name: [(s.name, s.alpha) for s in p.signatures] for p in listed}
    sigs = sorted({s for refs in table.values() for s, _ in refs})
    mix = [(sigs[0], 0.6), (sigs[len(sigs) // 2], 0.75), (sigs[-1], -0.25)]
    admin.PutProfile(admin_pb2.PutProfileRequest(
        name=MIX, replace=True, signatures=[inference_pb2.SignatureRef(name=n, alpha=al) for n, al in mix]))

    worst, answers, disagreements, failures = 0.0, 0, [], []
    correct = {}  # (kind, profile) -> [server correct, reference correct, n]
    for path in sorted(a.images.glob("*.png")):
        kind, _, label = path.stem.rsplit("_", 2)
        label = int(label)
        x = preprocess(path, cfg)[None].astype(np.float32)
        data = path.read_bytes()
        profiles = ["clean", "auto", MIX] + ([kind] if kind in table and kind != "clean" else [])
        for profile in profiles:
            r = infer.Classify(inference_pb2.ClassifyRequest(image=data, profile=profile, top_k=1,
                                                             return_logits=True))
            got = np.asarray(r.logits, np.float32)
            refs = [(s.name, s.alpha) for s in r.signatures]
            want = ref.logits(refs, x)
            err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
            worst = max(worst, err)
            answers += 1
            top2 = np.sort(want)[-2:]
            if err > a.tolerance:
                failures.append({"image": path.name, "profile": profile, "error": err})
            if int(np.argmax(got)) != int(np.argmax(want)):
                tie = (top2[1] - top2[0]) / max(1.0, float(np.max(np.abs(want)))) <= a.tolerance
                (disagreements if tie else failures).append(
                    {"image": path.name, "profile": profile, "server": int(np.argmax(got)),
                     "reference": int(np.argmax(want))})
            c = correct.setdefault(f"{kind}/{'own' if profile == kind != 'clean' else profile}", [0, 0, 0])
            c[0] += int(np.argmax(got)) == label
            c[1] += int(np.argmax(want)) == label
            c[2] += 1
    admin.DeleteProfile(admin_pb2.DeleteProfileRequest(name=MIX))

    accuracy = {k: {"server": v[0] / v[2], "reference": v[1] / v[2], "n": v[2]} for k, v in sorted(correct.items())}
    print(json.dumps({
        "passed": answers > 0 and not failures,
        "answers": answers,
        "reference_sessions": len(ref.sessions),
        "max_relative_error": worst,
        "tolerance": a.tolerance,
        "near_tie_disagreements": disagreements,
        "failures": failures[:20],
        "accuracy": accuracy,
    }, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
