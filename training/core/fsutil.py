"""Filesystem helpers shared by every writer of a folder that readers must never see half-written
(save_grm, both trainers' checkpoints, grm-ppo's policy export, grm-assets)."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Write a folder atomically: yields a hidden temporary folder next to `final` (mode 755), which
    becomes `final` (replacing an existing one, `replace_dir`) when the block ends, and is removed
    when the block raises (a killed writer leaves only a hidden ``.<name>-*`` folder behind).

        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with staged_dir(root / "ckpt") as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> (root / "ckpt" / "a.txt").read_text(), sorted(p.name for p in root.iterdir())
        ('done', ['ckpt'])
        >>> try:
        ...     with staged_dir(root / "other") as tmp:
        ...         raise OSError("disk full")
        ... except OSError:
        ...     pass
        >>> sorted(p.name for p in root.iterdir())
        ['ckpt']
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; what it becomes is not
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
