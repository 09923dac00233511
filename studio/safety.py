"""What the studio's web UI may read: one path guard for every server-side path, and limits on uploads.

Who is trusted: the CLI's user is the machine's local user and keeps full access (any path, any data, any
manifest): nothing here is called by :mod:`studio.cli`. The web UI does not trust its visitors, so every path a
page takes from a visitor goes through this module before anything is opened:

- :func:`check_path`: one path field (the Model page's checkpoint/export/data folder). It is resolved (symlinks
  and ``..`` included) and must lie under an allowed root; the refusal names the path as typed and is the same
  sentence whether or not anything exists there, so the UI cannot be used to probe for files outside the roots.
- :func:`guard_model_source`: a model field (Model page, Retrain "Teacher", Adapters "Backbone"): ``demo``,
  ``demo-backbone``, or a path through :func:`check_path`; an exported folder's ``manifest.json`` kwargs are checked
  by :func:`check_timm_kwargs` (no kwarg may name a file: ``checkpoint_path`` and friends would make a manifest open
  any file on the server), as are the Model page's "Extra timm kwargs".
- :func:`guard_data`: a data selection: its folder through :func:`check_path`, then every file it lists (each
  ImageFolder image, each VTAB list entry) resolved, so a symlinked class folder or image leading outside the
  roots is refused. VTAB entries that are absolute or climb out with ``..`` are refused by
  :mod:`studio.data` itself, for every caller (they are not VTAB-1k's relative paths).
- :func:`guard_spec`: what a page submits as a job: every :class:`ModelSpec` field (model, teacher) and the data
  path of the spec, checked again at the button (the one door to a job from the UI).

Allowed roots (:func:`allowed_roots`): the project's runs folder (``$STUDIO_RUNS``, default ``runs``) and
``assets/`` (the embedded demo), the upload folder, the working directory's ``data/`` and ``datasets/`` folders,
plus every folder ``$STUDIO_DATA_ROOTS`` names (``os.pathsep``-separated). The home folder is *not* a default root:
it holds keys and credentials. Uploads are limited in size (``$STUDIO_MAX_UPLOAD_MB``, default 512) and type,
stored under a content hash (no user-chosen file names on disk), and loaded like any checkpoint: without
unpickling objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .data import DATASETS, SPLITS, VTAB_LISTS, DataSpec
from .errors import StudioError
from .models import ASSETS, DEMO_SOURCES, ModelSpec
from .runs import write_bytes

ROOTS_ENV = "STUDIO_DATA_ROOTS"
UPLOAD_ENV = "STUDIO_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 512
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
DATA_FOLDERS = ("data", "datasets")  # the working directory's data folders, allowed by default
# timm constructor kwargs that make it read a file or fetch weights (timm.create_model -> build_model_with_cfg)
FILE_KWARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "cache_dir", "pretrained_strict"})
# entries of a ``pretrained_cfg_overlay`` that name a file or a download
FILE_CFG_KEYS = frozenset({"file", "url", "hf_hub_id", "hf_hub_filename", "state_dict"})


def allowed_roots() -> list[Path]:
    """Folders the UI may read from (resolved): ``$STUDIO_DATA_ROOTS``, then the defaults (never the home folder)."""

    env = os.environ.get(ROOTS_ENV, "")
    cwd = Path.cwd()
    # the named roots first: the refusal lists the first few, and those are the ones a user chose
    roots = [Path(p) for p in env.split(os.pathsep) if p.strip()]
    roots += [Path(os.environ.get("STUDIO_RUNS", "runs")), ASSETS, upload_dir()]
    roots += [cwd / name for name in DATA_FOLDERS]
    out: list[Path] = []
    for r in roots:
        r = r.expanduser().resolve()
        if r not in out:
            out.append(r)
    return out


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _outside(what: str, text: str, roots: list[Path]) -> StudioError:
    """The one refusal for a path outside the roots: it names the path as typed (not where it resolves to) and
    reads the same whether or not anything exists there."""
    shown = ", ".join(str(r) for r in roots[:3])
    return StudioError(
        f"{what} '{text}' is outside the folders this studio may read ({shown}, ...). Move it under one "
        f"of them, or start the studio with {ROOTS_ENV}=/your/folder."
    )


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
        raise _outside(what, text, roots)
    # only now (inside the roots) may the message tell whether the path exists
    if not path.exists():
        raise StudioError(f"{what} {path} does not exist.")
    if kind == "file" and not path.is_file():
        raise StudioError(f"{what} {path} is a folder; give a file.")
    if kind == "dir" and not path.is_dir():
        raise StudioError(f"{what} {path} is a file; give a folder.")
    return path


def check_timm_kwargs(kwargs: Mapping[str, Any], *, where: str) -> None:
    """Refuse timm constructor kwargs that name a file or a download (``checkpoint_path``, ``pretrained``,
    ``pretrained_cfg_overlay={"file": ...}``, ...): through them a manifest or a form could open any server file."""
    for key, value in kwargs.items():
        named = isinstance(value, Mapping) and sorted(FILE_CFG_KEYS & set(value))
        if key in FILE_KWARGS or (key == "pretrained_cfg_overlay" and named):
            what = f"'{key}'" + (f" ({', '.join(named)})" if named else "")
            raise StudioError(
                f"{where}: the timm kwarg {what} would make the model read a file or download weights, which the "
                "studio refuses; remove it (weights come from the checkpoint or the export's model.safetensors)."
            )


def guard_model_source(text: str, *, what: str) -> str:
    """A model field of the UI: ``demo``/``demo-backbone``, or a checkpoint file or exported folder under the
    roots whose manifest names no file; returns the source to put in a :class:`ModelSpec`."""
    text = (text or "").strip()
    if text in DEMO_SOURCES:
        return text
    path = check_path(text, what=what)
    manifest = path / "manifest.json"
    if path.is_dir() and manifest.is_file():
        try:
            base = json.loads(manifest.read_text(encoding="utf-8")).get("base") or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            base = {}  # the loader reports a damaged manifest in its own words
        kwargs = base.get("kwargs") if isinstance(base, dict) else None
        if isinstance(kwargs, Mapping):
            check_timm_kwargs(kwargs, where=f"{what} {path}/manifest.json")
    return str(path)


def guard_model(spec: ModelSpec, *, what: str = "Model") -> ModelSpec:
    """:func:`guard_model_source` and :func:`check_timm_kwargs` for a whole :class:`ModelSpec`."""
    check_timm_kwargs(spec.kwargs, where=what)
    source = guard_model_source(spec.source, what=what)
    return spec if source == spec.source else dataclasses.replace(spec, source=source)


def guard_data(spec: DataSpec, *, what: str = "Data folder", files: bool = True) -> DataSpec:
    """A data selection of the UI: its folder under the roots and, with ``files``, every image it lists too.

    Each split folder, class folder and image is resolved before anything is read from it, so a symbolic link
    leading outside the roots is refused with one sentence whether or not its target exists (a listing or an
    existence check through the link would tell)."""
    if spec.kind == "demo" or spec.path is None:
        return spec
    folder = check_path(spec.path, what=what, kind="dir")
    if not files:
        return spec
    roots = allowed_roots()

    def refuse(rel: str) -> StudioError:
        return StudioError(
            f"{what} {folder}: {rel} leads outside the folders this studio may read (a symbolic link); copy "
            "the images under the data folder instead of linking them."
        )

    listed: list[tuple[str, str]] = []  # (where, image path)
    if spec.kind == "imagefolder":
        for split in SPLITS:
            sub = folder / split
            if not _inside(sub.resolve(), roots):
                raise refuse(f"{split}/")
            if not sub.is_dir():
                continue
            for child in sub.iterdir():
                if not _inside(child.resolve(), roots):
                    raise refuse(f"{split}/{child.name}")
            ds = DATASETS.get("imagefolder")(spec, split)
            listed += [(str(Path(src).relative_to(folder)), str(src)) for src, _ in ds.items]
    elif spec.kind == "vtab":
        for split, name in VTAB_LISTS.items():
            if not (folder / name).is_file():
                continue  # optional lists (trainval); the loader names a missing required one
            # skip_bad_files: no existence check yet, so a missing and an outside file read the same
            ds = DATASETS.get("vtab")(dataclasses.replace(spec, skip_bad_files=True), split)
            listed += [(where, str(src)) for where, (src, _) in zip(ds.origin, ds.items)]
    for where, src in listed:
        if not _inside(Path(src).resolve(), roots):
            raise refuse(where)
    return spec


def guard_spec(spec: Any, *, names: Mapping[str, str] | None = None) -> None:
    """Every model and data field of a flow spec a page is about to submit (the job's own door); ``names`` maps a
    spec field to the label of its widget, for the message (e.g. ``{"model": "Backbone"}``)."""
    labels = {"model": "Model", "teacher": "Teacher", "data": "Data folder", **(names or {})}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        what = labels.get(f.name, f.name.capitalize())
        if isinstance(value, ModelSpec):
            guard_model(value, what=what)
        elif isinstance(value, DataSpec):
            # the files were checked when the data was picked (walking them on every rerun would be slow)
            guard_data(value, what=what, files=False)


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
