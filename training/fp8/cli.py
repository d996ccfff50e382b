"""`grm-quantize`: write an FP8 copy of a reward-model checkpoint (any format load_grm reads).

    $ grm-quantize runs/my-grm runs/my-grm-fp8 --recipe fp8-block64
    $ grm-serve --model.checkpoint runs/my-grm-fp8          # served as FP8, no start-up quantisation
"""

from __future__ import annotations

import argparse
import sys

from ..model import CheckpointError
from .convert import RECIPES, quantize_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grm-quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint folder to quantise")
    parser.add_argument("out", help="folder to write (replaced atomically if it exists)")
    parser.add_argument("--recipe", default="fp8-block64", choices=sorted(RECIPES), help="FP8 recipe")
    args = parser.parse_args(argv)
    try:
        report = quantize_checkpoint(args.src, args.out, args.recipe)
    except CheckpointError as exc:
        print(f"grm-quantize: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
