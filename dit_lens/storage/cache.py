"""Where dit-lens keeps what it computes and may recompute: one rule for every cached artefact.

The cache root is, in this order:

1. ``$DIT_LENS_CACHE`` when set;
2. ``cache/`` at the root of the source checkout dit-lens runs from (the folder holding the
   ``pyproject.toml`` of the ``dit-lens`` project, beside the ``dit_lens`` package);
3. ``~/.cache/dit-lens`` for an installed package.

Under it: ``captures/`` (capture stores, content-addressed), ``studies/`` (study folders) and
``demo/`` (the demo's outputs). Nothing there is irreplaceable: deleting it is always safe.

Examples:
    >>> import os
    >>> saved = os.environ.get(CACHE_ENV)
    >>> os.environ[CACHE_ENV] = "/tmp/somewhere"
    >>> str(cache_root() / "captures")
    '/tmp/somewhere/captures'
    >>> _ = os.environ.pop(CACHE_ENV) if saved is None else os.environ.update({CACHE_ENV: saved})
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = ["CACHE_ENV", "cache_root", "checkout_root", "content_key"]

#: Environment variable that overrides where cached artefacts live.
CACHE_ENV = "DIT_LENS_CACHE"


def checkout_root(package: Path | None = None) -> Path | None:
    """The source checkout the ``dit_lens`` package at `package` belongs to, or None when installed."""
    package = (package or Path(__file__).resolve().parent.parent)
    project = package.parent / "pyproject.toml"
    try:
        text = project.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return package.parent if re.search(r'^name\s*=\s*"dit-lens"', text, re.MULTILINE) else None


def cache_root() -> Path:
    """Root of every cached artefact: ``$DIT_LENS_CACHE``, else ``cache/`` of the checkout, else
    ``~/.cache/dit-lens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = checkout_root()
    return root / "cache" if root is not None else Path.home() / ".cache" / "dit-lens"


def content_key(identity: Mapping[str, Any]) -> str:
    """Stable hash of a JSON-able mapping (key order does not matter)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
