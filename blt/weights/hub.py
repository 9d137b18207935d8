"""Hub repo ids ("owner/name" or "owner/name@revision") resolved to a local snapshot directory.

A path that exists on disk always wins. Otherwise a name shaped like a repo id goes through
`huggingface_hub.snapshot_download`, which reads the cache under HF_HOME (or HF_HUB_CACHE) and, with
HF_HUB_OFFLINE=1, never touches the network. The environment is read at call time, so a test (or a user) can
set it after import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from blt.errors import BltError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None  # huggingface_hub's default (~/.cache/huggingface/hub)


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.match(name)) and not name.startswith((".", "/", "~"))


def resolve(name: str | os.PathLike) -> Path:
    """A local directory for `name`: the path itself when it exists (or is not repo-id shaped), else the Hub
    snapshot of the repo id at its revision (default `main`)."""
    path = Path(name)
    if not isinstance(name, str) or path.exists() or not is_repo_id(name):
        return path
    repo_id, _, revision = name.partition("@")
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415  (optional dependency, see `hub` extra)
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise BltError(
            f"{name} is not a local path; loading Hub ids needs huggingface_hub (pip install 'blt[hub]')"
        ) from e
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # noqa: PLC0415

    offline = _offline()
    try:
        snapshot = snapshot_download(
            repo_id, revision=revision or None, cache_dir=_cache_dir(), local_files_only=offline
        )
    except LocalEntryNotFoundError as e:
        hint = "HF_HUB_OFFLINE=1 is set" if offline else "the Hub could not be reached"
        raise BltError(
            f"{name} is neither a local path nor a cached Hub repo ({hint}; download it once with network, "
            f"or unset HF_HUB_OFFLINE)"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise BltError(f"could not fetch Hub repo {name}: {e} (set HF_HUB_OFFLINE=1 to use the cache only)") from e
    return Path(snapshot)
