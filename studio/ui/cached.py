"""Cached engine results for the current selection (keyed by the specs, never by the model object).

``st.cache_data`` returns a copy per call, so pages may change what they get back; models themselves are only
cached as resources (:mod:`studio.ui.state`, :func:`run_model`) and never mutated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import streamlit as st

from ..data import DataSpec
from ..load import load_model
from ..models import LoadedModel, ModelSpec
from ..summary import evaluate_split, model_summary
from . import state


def model_key(spec: ModelSpec | None = None) -> str:
    """A stable text key of a model spec (also used to key per-model session results)."""
    return json.dumps((spec or state.model_spec()).to_dict(), sort_keys=True)


def data_key(spec: DataSpec | None = None) -> str:
    return json.dumps((spec or state.data_spec()).to_dict(), sort_keys=True)


@st.cache_data(max_entries=32, show_spinner=False)
def _summary(key: str, _loaded: LoadedModel) -> dict[str, Any]:

    return model_summary(_loaded)


def summary(loaded: LoadedModel | None = None, key: str | None = None) -> dict[str, Any]:
    """:func:`studio.summary.model_summary` of the current model (or of ``loaded``, cached under ``key``).

    Keys are content keys (a spec, an export folder), never ``id()``: an object's id is reused after it is
    freed, so two different models would share a cached result.
    """
    if loaded is None:
        return _summary(model_key(), state.pristine_model())
    if key is None:
        raise ValueError("a model other than the current one needs a content key (e.g. its export folder)")
    return _summary(key, loaded)


@st.cache_data(max_entries=32, show_spinner="Evaluating on the test split…")
def _accuracy(mkey: str, dkey: str, split: str, _loaded: LoadedModel, _data: DataSpec) -> dict[str, Any]:

    return evaluate_split(_loaded, _data, split)


def accuracy(
    split: str = "test", loaded: LoadedModel | None = None, key: str | None = None
) -> dict[str, Any]:
    """Top-1 / per-class accuracy on a split of the current data (current model unless ``loaded`` given)."""
    data = state.data_spec()
    if loaded is None:
        return _accuracy(model_key(), data_key(data), split, state.pristine_model(), data)
    if key is None:
        raise ValueError("a model other than the current one needs a content key (e.g. its export folder)")
    return _accuracy(key, data_key(data), split, loaded, data)


@st.cache_resource(max_entries=8, show_spinner="Loading the run's model…")
def _run_model(folder: str, mtime: float, device: str) -> LoadedModel:
    return load_model(ModelSpec(folder, device=device))


def run_model(folder: str | Path) -> LoadedModel:
    """An exported model folder (e.g. ``runs/<id>/export``), loaded once per server and never mutated."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    mtime = manifest.stat().st_mtime if manifest.exists() else 0.0
    return _run_model(str(folder.resolve()), mtime, state.model_spec().device)
