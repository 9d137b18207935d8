"""Folders the tool makes, and only those, are the tool's to replace.

Every folder a command creates carries a marker file, `.blt-run`, a small JSON object naming the command and
the kind of folder (`{"made_by": "blt train", "kind": "blt-run"}`). A command replaces or removes a folder only
when it carries a marker of the command's own kind; anything else (a user's folder, another command's run,
a file) is refused with one line and left untouched. A training holds an advisory lock (`fcntl.flock`) on
its folder's `.blt-lock` file, which names its pid, so a second training into the same folder stops at once.
Temporary files live inside the folder under names starting with `.tmp-` and are removed on the next start.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from blt.errors import BltError

MARKER = ".blt-run"
LOCK = ".blt-lock"
TMP_PREFIX = ".tmp-"


def marker(path: Path) -> dict | None:
    """The marker of `path`, or None when it has none (or an unreadable one)."""
    try:
        m = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def is_ours(path: Path, kind: str) -> bool:
    m = marker(path)
    return m is not None and m.get("kind") == kind


def _write_marker(path: Path, kind: str, command: str) -> None:
    (path / MARKER).write_text(json.dumps({"made_by": command, "kind": kind}) + "\n")


def claim(path: str | os.PathLike, kind: str, command: str, replace: bool = False) -> Path:
    """Make `path` a folder of `kind`: create it (with its marker), or accept it when it is empty or already
    carries a `kind` marker (emptied first when `replace`). Anything else: BltError, nothing changed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BltError(f"{path} exists and is not a folder")
    if path.is_dir():
        entries = [e for e in path.iterdir()]
        if entries and not is_ours(path, kind):
            m = marker(path)
            what = (
                f"a folder made by {m.get('made_by', '?')} ({m.get('kind', '?')})" if m else "a folder blt did not make"
            )
            raise BltError(f"{path} is {what}; refusing to write into it (choose another folder)")
        if replace:
            empty_folder(path, kind)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not (path / MARKER).exists():
            _write_marker(path, kind, command)
    except OSError as e:
        raise BltError(f"cannot create {path}: {e.strerror or e}") from None
    return path


def adopt(path: Path, kind: str, command: str) -> None:
    """Mark a folder the caller has recognised as its own (a run written before markers existed)."""
    _write_marker(path, kind, command)


def empty_folder(path: Path, kind: str, keep: tuple[str, ...] = (MARKER, LOCK)) -> None:
    """Remove what a folder of our own `kind` holds (but its marker and lock)."""
    if not is_ours(path, kind):
        raise BltError(f"{path} was not made by blt as a {kind} folder; refusing to remove it")
    for entry in path.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_own(path: Path, kind: str) -> None:
    """Delete a whole folder of our own `kind`; refuse any other."""
    if not path.exists():
        return
    if not path.is_dir() or not is_ours(path, kind):
        raise BltError(f"{path} was not made by blt as a {kind} folder; refusing to remove it")
    shutil.rmtree(path)


def clean_temporaries(path: Path) -> None:
    """Remove `.tmp-*` leftovers of an earlier, interrupted process in `path` and its direct subfolders."""
    for folder in (path, *(p for p in path.iterdir() if p.is_dir())) if path.is_dir() else ():
        for entry in folder.glob(TMP_PREFIX + "*"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def lock(path: Path):
    """Hold the advisory lock of run folder `path` for this process (the returned file keeps it; it is
    released when the file is closed or the process ends). A folder locked by another process: BltError."""
    f = open(path / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise BltError(f"{path} is in use by another training (pid {holder}); wait for it or choose another --out")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
