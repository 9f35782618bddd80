"""Regenerate the committed gRPC stubs from controller.proto: python -m resilient_moe.proto.regenerate"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    root = here.parents[1]
    status = protoc.main([
        "grpc_tools.protoc", f"-I{root}", f"--python_out={root}", f"--grpc_python_out={root}",
        str(here / "controller.proto"),
    ])
    if status == 0:
        print(f"regenerated {here / 'controller_pb2.py'} and {here / 'controller_pb2_grpc.py'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
