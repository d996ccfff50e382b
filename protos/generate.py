"""Regenerate the Python gRPC code for protos/grmserve/reward/v1/reward.proto.

    python protos/generate.py            # rewrite the generated files
    python protos/generate.py --check    # exit 1 if they are stale (tests run this)

The generated `*_pb2_grpc.py` imports its messages with an absolute path derived from the proto
folder (`grmserve.reward.v1`); it is rewritten to a relative import so the code works under the
installed namespace `grmserve.protos.grmserve.reward.v1`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO = Path("grmserve/reward/v1/reward.proto")
OUTPUTS = ("reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py")


def generate() -> dict[str, str]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                str(ROOT / PROTO)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out = {}
        for name in OUTPUTS:
            text = (Path(tmp) / PROTO.parent / name).read_text()
            text = text.replace("from grmserve.reward.v1 import reward_pb2", "from . import reward_pb2")
            out[name] = text
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generate().items():
        target = ROOT / PROTO.parent / name
        if target.exists() and target.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            target.write_text(text)
    if args.check and stale:
        print(f"stale generated code: {stale}; run `python protos/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
