"""Compile serving/proto/*.proto into *_pb2.py / *_pb2.pyi / *_pb2_grpc.py.

Run by setup.py's build_py (so every `pip install` regenerates them) and by
`make proto`. The generated files are build outputs: git-ignored, never edited.
"""
from __future__ import annotations

import sys
from pathlib import Path


def compile_protos(root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted((root / "serving" / "proto").glob("*.proto"))
    for proto in protos:
        rel = proto.relative_to(root)
        rc = protoc.main([
            "protoc", f"-I{root}", f"-I{include}",
            f"--python_out={root}", f"--pyi_out={root}", f"--grpc_python_out={root}",
            str(rel),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {rel} (exit {rc})")
    return protos


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    for p in compile_protos(root):
        print(f"compiled {p.relative_to(root)}")
