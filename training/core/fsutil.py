"""Filesystem helpers shared by checkpoint writers (save_grm, the trainer, grm-assets)."""

from __future__ import annotations

import shutil
from pathlib import Path


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the finished folder `src` to `dst`; an existing `dst` is moved aside first and removed
    after, so `dst` is never half-written."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)
