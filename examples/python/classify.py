"""A small Python client for rws's own API (rws.v1): classify an image with a
robustness profile, list the profiles, change the default one.

    examples/python/generate.sh                    # once: the stubs, into examples/python/generated
    python examples/python/classify.py classify docs/fog-digit.png --profile fog
    python examples/python/classify.py profiles
    python examples/python/classify.py default fog

--addr (default 127.0.0.1:50051) names the server. Admin calls (profiles,
default) are accepted from loopback clients, or with --token when the server
was started with an admin token.
"""

import argparse
import os
import sys

import grpc

# The stubs from generate.sh; PYTHONPATH may point elsewhere instead.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "generated"))
from rws.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc  # noqa: E402


def classify(channel, args):
    with open(args.image, "rb") as f:
        request = inference_pb2.ClassifyRequest(image=f.read(), profile=args.profile, top_k=args.top_k)
    reply = inference_pb2_grpc.InferenceStub(channel).Classify(request)
    print(f"profile {reply.profile} (generation {reply.generation})")
    for p in reply.top_k:
        print(f"{p.score * 100:6.2f}%  {p.label} (class {p.index})")


def profiles(channel, args, metadata):
    reply = admin_pb2_grpc.AdminStub(channel).ListProfiles(admin_pb2.ListProfilesRequest(), metadata=metadata)
    for p in reply.profiles:
        sigs = " ".join(f"{s.name}@{s.alpha:g}" for s in p.signatures) or "-"
        mark = "  (default)" if p.is_default else ""
        print(f"{p.name}: {sigs}{mark}")


def set_default(channel, args, metadata):
    request = admin_pb2.SetDefaultProfileRequest(name=args.name)
    change = admin_pb2_grpc.AdminStub(channel).SetDefaultProfile(request, metadata=metadata)
    print(f"default profile is now {change.profile.name} (server generation {change.generation})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--token", help="admin bearer token, if the server requires one")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="classify a PNG or JPEG")
    c.add_argument("image")
    c.add_argument("--profile", default="", help="profile to use (default: the server's default)")
    c.add_argument("--top-k", type=int, default=5)
    sub.add_parser("profiles", help="list profiles")
    d = sub.add_parser("default", help="set the default profile")
    d.add_argument("name")
    args = parser.parse_args()

    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    with grpc.insecure_channel(args.addr) as channel:
        try:
            if args.command == "classify":
                classify(channel, args)
            elif args.command == "profiles":
                profiles(channel, args, metadata)
            else:
                set_default(channel, args, metadata)
        except grpc.RpcError as e:
            sys.exit(f"rws: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
