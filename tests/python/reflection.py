"""Discovers the server's gRPC API through server reflection, as grpcurl,
Postman or Evans do, with grpcio's reflection client.

    python tests/python/reflection.py HOST:PORT

Exits non-zero with a message at the first failed check.
"""

import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

EXPECTED = ["rws.v1.Inference", "rws.v1.Admin", "grpc.health.v1.Health", "inference.GRPCInferenceService"]


def check(ok, message):
    if not ok:
        sys.exit(f"FAIL: {message}")


def main():
    with grpc.insecure_channel(sys.argv[1]) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        for name in EXPECTED:
            check(name in services, f"{name} is not listed; the server lists {services}")
        proto = db.FindFileContainingSymbol("rws.v1.Inference")
        check(proto.name == "rws/v1/inference.proto", f"rws.v1.Inference comes from {proto.name}")
        # A pool over the database resolves whole services, dependencies included.
        classify = DescriptorPool(db).FindServiceByName("rws.v1.Inference").FindMethodByName("Classify")
        check(classify.input_type.full_name == "rws.v1.ClassifyRequest", "Classify's request type")
    print("reflection:", ", ".join(sorted(services)))


if __name__ == "__main__":
    main()
