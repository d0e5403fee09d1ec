"""Content-addressed cache files: a file's name carries a digest of its bytes, checked before the file is used.

Used for the compiled CPU kernels: a truncated or edited shared library is never ``dlopen``-ed (that can kill the
process with SIGBUS); it is removed and rebuilt instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DIGEST_CHARS = 16


def file_digest(path: str | os.PathLike) -> str:
    """The first ``DIGEST_CHARS`` hex digits of the SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:DIGEST_CHARS]


def digest_path(folder: Path, stem: str, suffix: str, content: str | os.PathLike) -> Path:
    """Where ``content`` is stored in the cache: ``folder/<stem>-<digest><suffix>``."""
    return folder / f"{stem}-{file_digest(content)}{suffix}"


def find_verified(folder: Path, stem: str, suffix: str) -> tuple[Path | None, list[Path]]:
    """The cached ``<stem>-<digest><suffix>`` whose bytes match its digest, and the mismatching ones (removed)."""
    good, bad = None, []
    if not folder.is_dir():
        return None, []
    for path in sorted(folder.glob(f"{stem}-*{suffix}")):
        tag = path.name[len(stem) + 1 : len(path.name) - len(suffix)]
        if len(tag) != DIGEST_CHARS:
            continue
        try:
            ok = file_digest(path) == tag
        except OSError:
            ok = False
        if ok and good is None:
            good = path
        elif not ok:
            bad.append(path)
            try:
                path.unlink()
            except OSError:
                pass
    return good, bad
