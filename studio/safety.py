"""What the studio's web UI may read: allowed roots for server-side paths and limits on uploads.

The CLI trusts its user; the web UI does not trust its visitors. A path typed into the browser is resolved
(symlinks included) and must lie under one of the allowed roots: ``$STUDIO_DATA_ROOTS`` (``os.pathsep``-separated)
or, by default, the current folder and the home folder, plus the runs folder and the embedded demo. Uploads are
limited in size (``$STUDIO_MAX_UPLOAD_MB``, default 512) and type, stored under a content hash (no user-chosen
file names on disk), and loaded like any checkpoint: without unpickling objects.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import StudioError
from .models import ASSETS
from .runs import write_bytes

ROOTS_ENV = "STUDIO_DATA_ROOTS"
UPLOAD_ENV = "STUDIO_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 512
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def allowed_roots() -> list[Path]:
    """Folders the UI may read from (resolved)."""

    env = os.environ.get(ROOTS_ENV, "")
    roots = [Path(p) for p in env.split(os.pathsep) if p.strip()] or [Path.cwd(), Path.home()]
    roots += [Path(os.environ.get("STUDIO_RUNS", "runs")), ASSETS, upload_dir()]
    out: list[Path] = []
    for r in roots:
        r = r.expanduser().resolve()
        if r not in out:
            out.append(r)
    return out


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def check_path(text: str, *, what: str, kind: str | None = None) -> Path:
    """Resolve a path typed in the UI and check it lies under an allowed root and exists.

    Args:
        what: what the path is for, used in the message ("Checkpoint", "Data folder", ...).
        kind: ``file``, ``dir`` or None (either).
    """
    text = (text or "").strip()
    if not text:
        raise StudioError(f"{what}: enter a path.")
    if "\x00" in text:
        raise StudioError(f"{what}: the path contains a NUL character.")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    roots = allowed_roots()
    if not _inside(path, roots):
        shown = ", ".join(str(r) for r in roots[:3])
        raise StudioError(
            f"{what} {path} is outside the folders this studio may read ({shown}, ...). Move it under one "
            f"of them, or start the studio with {ROOTS_ENV}=/your/folder."
        )
    if not path.exists():
        raise StudioError(f"{what} {path} does not exist.")
    if kind == "file" and not path.is_file():
        raise StudioError(f"{what} {path} is a folder; give a file.")
    if kind == "dir" and not path.is_dir():
        raise StudioError(f"{what} {path} is a file; give a folder.")
    return path


def max_upload_bytes() -> int:
    try:
        mb = float(os.environ.get(UPLOAD_ENV, DEFAULT_MAX_UPLOAD_MB))
    except ValueError:
        mb = DEFAULT_MAX_UPLOAD_MB
    return int(mb * 1024 * 1024)


def upload_dir() -> Path:
    return Path(tempfile.gettempdir()) / "pruning-studio-uploads"


def save_upload(name: str, data: bytes, *, suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> Path:
    """Check an uploaded file's type and size, store it under its content hash and return the path."""
    suffix = Path(name).suffix.lower()
    if suffix not in suffixes:
        raise StudioError(
            f"Upload '{Path(name).name}' has type '{suffix or 'none'}'; accepted: {', '.join(suffixes)}."
        )
    limit = max_upload_bytes()
    if len(data) > limit:
        raise StudioError(
            f"Upload '{Path(name).name}' is {len(data) / 2**20:.0f} MB, over the {limit / 2**20:.0f} MB limit. "
            f"Put the file on the server and enter its path instead, or raise {UPLOAD_ENV}."
        )
    if not data:
        raise StudioError(f"Upload '{Path(name).name}' is empty.")
    folder = upload_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:24]}{suffix}"
    if not path.exists():
        write_bytes(path, data)
    return path
