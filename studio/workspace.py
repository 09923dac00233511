"""A session's workspace on disk, so a reload or a second browser tab with the same URL restores the work.

The Streamlit session (one per tab) is memory only: a reload starts a new one. A workspace is a folder,
``<runs root>/.workspaces/<id>/``, that the app addresses from the URL (``?ws=<id>``) and that holds:

- ``state.json``: the model and data selection, the active plan with its hand edits (and the run it came from),
  each page's form values, and what a page follows (the job it started, its last result), all plain JSON;
- ``analyses/``: computed analyses (a layer's t-SNE/UMAP embedding, an importance result), one
  ``<digest>.json`` (name, metadata) plus an optional ``<digest>.safetensors`` (arrays) each. Their number and
  bytes are capped; the least recently used go first, so a workspace never grows without bound.

Files are written atomically (temp file + rename, :func:`studio.runs.atomic_path`) and never pickled: a
workspace written by one process is read safely by another (two tabs on one server, or a restarted server).
The engine side only: :mod:`studio.ui.state` is the Streamlit glue that fills and reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import StudioError
from .runs import atomic_path, write_text

WORKSPACES = ".workspaces"
STATE_FILE = "state.json"
VERSION = 1
_ID = re.compile(r"^[a-z0-9]{8,40}$")  # the id becomes a folder name: no separators, no dots
MAX_ANALYSES = 64
MAX_ANALYSIS_BYTES = 256 * 2**20
MAX_WORKSPACES = 64  # every visit without ?ws= starts one: the least recently saved beyond this go


def new_id() -> str:
    """A fresh, unguessable workspace id (16 hex digits)."""
    return secrets.token_hex(8)


def valid_id(ws_id: Any) -> bool:
    """Whether ``ws_id`` can name a workspace (lower-case letters and digits, 8-40 of them)."""
    return isinstance(ws_id, str) and _ID.fullmatch(ws_id) is not None


def empty_state() -> dict[str, Any]:
    """The state of a workspace nothing was saved in yet."""
    return {
        "version": VERSION,
        "model": None,
        "data": None,
        "plan": None,
        "plan_source": None,
        "forms": {},
        "kept": {},
    }


def jsonable(value: Any) -> bool:
    """Whether ``value`` survives a JSON round trip unchanged in kind (dicts with str keys, lists, scalars)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return not isinstance(value, float) or np.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(jsonable(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and jsonable(v) for k, v in value.items())
    return False


def prune_workspaces(
    runs_root: str | Path, *, keep: int = MAX_WORKSPACES, spare: str | None = None
) -> list[str]:
    """Delete the least recently saved workspaces beyond ``keep`` (never ``spare``); returns the deleted ids.

    Called when a session starts a new workspace, so the folder stays bounded however many visits there are."""
    folder = Path(runs_root) / WORKSPACES
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.is_dir() and valid_id(p.name) and p.name != spare:
            try:
                found.append(((p / STATE_FILE).stat().st_mtime if (p / STATE_FILE).exists() else 0.0, p))
            except OSError:
                continue
    found.sort()
    doomed = found[: max(0, len(found) - keep)]
    for _, p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for _, p in doomed]


@dataclass(frozen=True)
class Workspace:
    """One workspace folder; cheap to create (nothing is read until asked)."""

    path: Path
    max_analyses: int = MAX_ANALYSES
    max_analysis_bytes: int = MAX_ANALYSIS_BYTES

    @classmethod
    def open(cls, runs_root: str | Path, ws_id: str, **limits: int) -> Workspace:
        """The workspace ``ws_id`` under ``runs_root`` (created on first write); refuses an id that is no name."""
        if not valid_id(ws_id):
            raise StudioError(f"{ws_id!r} is not a workspace id (8-40 lower-case letters and digits).")
        return cls(Path(runs_root) / WORKSPACES / ws_id, **limits)

    @property
    def id(self) -> str:
        return self.path.name

    # -- state.json ---------------------------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        """The saved state, or :func:`empty_state` when there is none or it cannot be read (a reload never fails
        on a damaged workspace: it starts afresh, and the next save replaces the file)."""
        state = empty_state()
        try:
            saved = json.loads((self.path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return state
        if isinstance(saved, dict) and saved.get("version") == VERSION:
            state.update({k: saved[k] for k in state if k in saved})
        return state

    def save_state(self, state: Mapping[str, Any]) -> bool:
        """Write ``state`` atomically if it differs from what is on disk; returns whether it wrote.

        Pages run on every click, so an unchanged state costs one read, not a write.
        """
        text = json.dumps({**empty_state(), **state, "version": VERSION}, indent=1, sort_keys=True) + "\n"
        file = self.path / STATE_FILE
        try:
            if file.read_text(encoding="utf-8") == text:
                return False
        except OSError:
            pass
        write_text(file, text)
        return True

    # -- analyses -----------------------------------------------------------------------------------------------
    def _files(self, name: str) -> tuple[Path, Path]:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
        folder = self.path / "analyses"
        return folder / f"{digest}.json", folder / f"{digest}.safetensors"

    def put_analysis(
        self,
        name: str,
        meta: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    ) -> None:
        """Store an analysis under ``name``: ``meta`` as JSON, ``arrays`` (if any) as safetensors; then evict the
        least recently used analyses beyond the caps."""
        if not jsonable(meta):
            raise StudioError(f"Analysis {name!r}: its metadata is not plain JSON.")
        meta_file, tensor_file = self._files(name)
        tensors = {k: torch.as_tensor(np.asarray(v)).contiguous() for k, v in (arrays or {}).items()}
        if tensors:
            with atomic_path(tensor_file) as tmp:
                save_file(tensors, str(tmp))
        elif tensor_file.exists():
            tensor_file.unlink()
        # the JSON goes last: an analysis exists once its JSON does, so a reader never finds half of one
        body = {"name": name, "arrays": sorted(tensors), "saved": time.time(), "meta": dict(meta)}
        write_text(meta_file, json.dumps(body) + "\n")
        self._evict()

    def get_analysis(self, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """``(meta, arrays)`` of the analysis ``name``, or None when it is not stored (or was evicted)."""
        meta_file, tensor_file = self._files(name)
        try:
            body = json.loads(meta_file.read_text(encoding="utf-8"))
            if body.get("name") != name:  # a digest collision: not ours
                return None
            arrays = load_file(str(tensor_file)) if body.get("arrays") else {}
        except (OSError, ValueError, RuntimeError):
            return None
        if set(arrays) != set(body.get("arrays", ())):
            return None
        now = time.time()
        os.utime(meta_file, (now, now))  # used: the eviction keeps it longer
        return body["meta"], arrays

    def analyses(self) -> list[str]:
        """Names of the stored analyses, least recently used first."""
        names = []
        for meta_file in self._by_age():
            try:
                names.append(json.loads(meta_file.read_text(encoding="utf-8"))["name"])
            except (OSError, ValueError, KeyError):
                continue
        return names

    def _by_age(self) -> list[Path]:
        folder = self.path / "analyses"
        if not folder.is_dir():
            return []
        files = []
        for f in folder.glob("*.json"):
            try:
                files.append((f.stat().st_mtime, f))
            except OSError:  # evicted by another tab meanwhile
                continue
        return [f for _, f in sorted(files)]

    def _evict(self) -> None:
        files = self._by_age()

        def size(meta_file: Path) -> int:
            total = 0
            for f in (meta_file, meta_file.with_suffix(".safetensors")):
                with contextlib.suppress(OSError):
                    total += f.stat().st_size
            return total

        sizes = [size(f) for f in files]
        total = sum(sizes)
        # keep the newest one whatever its size: evicting what was just stored would make it useless
        while len(files) > 1 and (len(files) > self.max_analyses or total > self.max_analysis_bytes):
            oldest, files = files[0], files[1:]
            total -= sizes.pop(0)
            for f in (oldest, oldest.with_suffix(".safetensors")):
                f.unlink(missing_ok=True)
