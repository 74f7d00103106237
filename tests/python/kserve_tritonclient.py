"""rws's Open Inference Protocol (KServe v2) service, driven by Triton's own
Python client exactly as a Triton or KServe user would call it.

    python tests/python/kserve_tritonclient.py CASE.json

CASE.json (tests/python.rs writes it): "url" (host:port), "model", "shape" and
"input_bits" (an FP32 input as uint32 bit patterns, so nothing is rounded on the
way), "png" (a path), and the logits bits rws.v1 returned for them:
"clean_bits", "fog_bits" and "png_bits" (the PNG under the default profile).
Exits non-zero with a message at the first failed check.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def check(ok, message):
    if not ok:
        sys.exit(f"FAIL: {message}")


def bits(values):
    return np.asarray(values, dtype=np.uint32)


def main():
    with open(sys.argv[1]) as f:
        case = json.load(f)
    model = case["model"]
    client = grpcclient.InferenceServerClient(url=case["url"])

    check(client.is_server_live(), "server is not live")
    check(client.is_server_ready(), "server is not ready")
    check(client.is_model_ready(model), "model is not ready")
    check(client.get_server_metadata().name == "rws", "server metadata names another server")
    meta = client.get_model_metadata(model)
    check(meta.platform == "rws", f"platform {meta.platform}")
    check([i.name for i in meta.inputs] == ["input"], "inputs")
    check(list(meta.inputs[0].shape) == [-1] + case["shape"][1:], f"input shape {meta.inputs[0].shape}")
    outputs = [o.name for o in meta.outputs]
    check(outputs == ["logits", "class", "signatures", "detector_confidence"], f"outputs {outputs}")

    x = bits(case["input_bits"]).view(np.float32).reshape(case["shape"])

    def infer(profile=None):
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        params = {"profile": profile} if profile else None
        return client.infer(model, [tensor], request_id="py-1", parameters=params)

    clean = infer()
    logits = clean.as_numpy("logits")
    check(logits.shape == (1, len(case["clean_bits"])), f"logits shape {logits.shape}")
    check(np.array_equal(logits.view(np.uint32)[0], bits(case["clean_bits"])), "clean logits differ from rws.v1")
    check(clean.as_numpy("class")[0] == np.argmax(logits[0]), "class is not the argmax")
    check(clean.get_response().id == "py-1", "request id not echoed")
    check(clean.get_response().parameters["profile"].string_param == "clean", "default profile")

    fog = infer("fog")
    check(np.array_equal(fog.as_numpy("logits").view(np.uint32)[0], bits(case["fog_bits"])), "fog logits differ from rws.v1")
    check(not np.array_equal(fog.as_numpy("logits"), logits), "the fog profile did not change the logits")
    check(fog.get_response().parameters["profile"].string_param == "fog", "fog profile not reported")
    # What served each image, by name; no detector ran for a named profile.
    check(clean.as_numpy("signatures")[0] == b"clean", f"clean served by {clean.as_numpy('signatures')}")
    check(fog.as_numpy("signatures")[0].startswith(b"fog@"), f"fog served by {fog.as_numpy('signatures')}")
    check(np.isnan(fog.as_numpy("detector_confidence")[0]), "a confidence without a detector")

    try:
        infer("no-such-profile")
        check(False, "an unknown profile was accepted")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.NOT_FOUND", f"unknown profile gave {e.status()}")

    with open(case["png"], "rb") as f:
        png = np.array([f.read()], dtype=np.object_)
    tensor = grpcclient.InferInput("input", [1], "BYTES")
    tensor.set_data_from_numpy(png)
    only_logits = [grpcclient.InferRequestedOutput("logits")]
    result = client.infer(model, [tensor], outputs=only_logits)
    check(result.as_numpy("class") is None, "an output that was not asked for came back")
    check(np.array_equal(result.as_numpy("logits").view(np.uint32)[0], bits(case["png_bits"])), "PNG logits differ from rws.v1")
    print("tritonclient: all checks passed")


if __name__ == "__main__":
    main()
