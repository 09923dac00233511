"""Session state and caching for the pages.

Rules: the pristine model is loaded once per spec with ``st.cache_resource`` and NEVER mutated (take
:func:`working_copy` before pruning or training); everything a user chooses lives in ``st.session_state``
(one browser tab = one session, no shared mutable state); engine errors become messages, not tracebacks.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import streamlit as st

from ..data import DataSpec
from ..errors import StudioError
from ..events import Event
from ..load import load_model
from ..models import LoadedModel, ModelSpec
from ..plan import PrunePlan

MODEL_KEY, DATA_KEY, PLAN_KEY = "studio_model_spec", "studio_data_spec", "studio_active_plan"
PLAN_SOURCE_KEY = "studio_active_plan_source"


def runs_root() -> Path:
    """Where runs live (``$STUDIO_RUNS`` or ``./runs``)."""
    return Path(os.environ.get("STUDIO_RUNS", "runs")).resolve()


def model_spec() -> ModelSpec:
    return st.session_state.setdefault(MODEL_KEY, ModelSpec("demo"))


def data_spec() -> DataSpec:
    return st.session_state.setdefault(DATA_KEY, DataSpec("demo"))


def set_specs(model: ModelSpec | None = None, data: DataSpec | None = None) -> None:
    if model is not None:
        st.session_state[MODEL_KEY] = model
    if data is not None:
        st.session_state[DATA_KEY] = data


@st.cache_resource(max_entries=4, show_spinner="Loading model…")
def _load_cached(spec_key: str, _spec: ModelSpec) -> LoadedModel:
    return load_model(_spec)


def pristine_model() -> LoadedModel:
    """The current model as loaded (shared, read-only: never train or prune it in place)."""
    spec = model_spec()
    return _load_cached(repr(spec.to_dict()), spec)


def working_copy() -> LoadedModel:
    """A private deep copy of the current model, safe to prune or train."""
    return copy.deepcopy(pristine_model())


def active_plan() -> PrunePlan | None:
    return st.session_state.get(PLAN_KEY)


def set_active_plan(plan: PrunePlan | None, *, source: str | Path | None = None) -> None:
    """Make ``plan`` the active plan; ``source``: the run folder whose trained model it is the structure of
    (a P3B, SPLoRA or retrained SLS run), so exporting the active plan exports that run's trained weights rather
    than the plan applied to the untrained current model. Any later plan (a hand edit) drops the source."""
    st.session_state[PLAN_KEY] = plan
    st.session_state[PLAN_SOURCE_KEY] = None if plan is None or source is None else (plan, str(source))


def active_plan_source() -> Path | None:
    """The run the active plan came from, while the active plan is still that run's plan, unedited."""
    plan, held = st.session_state.get(PLAN_KEY), st.session_state.get(PLAN_SOURCE_KEY)
    if plan is None or held is None or held[0].to_dict() != plan.to_dict():
        return None
    return Path(held[1])


@contextmanager
def user_errors() -> Iterator[None]:
    """Show :class:`StudioError` (and unexpected errors) as a message instead of a traceback."""
    try:
        yield
    except StudioError as e:
        st.error(str(e))
    except Exception as e:  # the UI never shows a traceback; the message says what failed
        st.error(f"Something went wrong: {type(e).__name__}: {e}")


def problem_of(spec: Any) -> str | None:
    """Why ``spec`` (a flow spec) cannot run, in one sentence, or None: shown beside the widgets before a start."""
    try:
        spec.validate()
    except StudioError as e:
        return str(e)
    return None


class StreamlitProgress:
    """An engine callback drawing ``progress`` events into one ``st.progress`` bar."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = st.progress(0.0, text=label)

    def __call__(self, event: Event) -> None:
        if event.kind != "progress":
            return
        d: dict[str, Any] = event.data
        total = max(1, int(d.get("total") or 1))
        self.bar.progress(
            min(1.0, int(d.get("done", 0)) / total),
            text=f"{self.label}: {d.get('task', '')} {d.get('done', 0)}/{total}",
        )

    def done(self) -> None:
        self.bar.empty()
