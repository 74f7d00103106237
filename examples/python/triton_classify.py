"""Classify a photo with Triton's own client, `tritonclient.grpc`, over the Open
Inference Protocol (KServe v2) that rws serves beside rws.v1: the encoded JPEG or
PNG goes as one BYTES element, and the profile as a request parameter.

    python examples/python/triton_classify.py data/imagenet/photos/chelsea.jpg \\
        --model efficientnet-lite0 --labels models/efficientnet-lite0/model.toml

Needs only `pip install tritonclient[grpc] numpy` (tests/python/requirements.txt pins
them). --labels reads the class names from the model's model.toml.
"""

import argparse
import sys
import tomllib

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", help="a JPEG or PNG file")
    ap.add_argument("--addr", default="127.0.0.1:50051", help="server host:port")
    ap.add_argument("--model", required=True, help="the served model's name (its directory)")
    ap.add_argument("--profile", default="", help="profile to serve it with (default: the server's)")
    ap.add_argument("--labels", help="model.toml to name the classes from")
    ap.add_argument("--top-k", type=int, default=3)
    a = ap.parse_args()

    with open(a.image, "rb") as f:
        data = np.array([f.read()], dtype=np.object_)
    image = grpcclient.InferInput("input", [1], "BYTES")
    image.set_data_from_numpy(data)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("logits", "signatures")]
    parameters = {"profile": a.profile} if a.profile else None
    client = grpcclient.InferenceServerClient(a.addr)
    try:
        result = client.infer(a.model, [image], outputs=outputs, parameters=parameters)
    except InferenceServerException as e:
        sys.exit(f"triton_classify: {e.status()}: {e.message()}")
    logits = result.as_numpy("logits")[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    labels = tomllib.loads(open(a.labels).read())["labels"] if a.labels else None
    served = result.as_numpy("signatures")[0].decode()
    print(f"served with {served}")
    for i in np.argsort(-probs)[: a.top_k]:
        name = labels[i] if labels else str(i)
        print(f"{probs[i] * 100:6.2f}%  {name} (class {i})")


if __name__ == "__main__":
    main()
