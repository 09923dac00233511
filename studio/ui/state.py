"""Session state and caching for the pages.

Rules: the pristine model is loaded once per spec with ``st.cache_resource`` and NEVER mutated (take
:func:`working_copy` before pruning or training); everything a user chooses lives in ``st.session_state``
(one browser tab = one session, no shared mutable state); engine errors become messages, not tracebacks.

The session is mirrored into a workspace on disk (:mod:`studio.workspace`) addressed from the URL (``?ws=<id>``):
:func:`begin_run` (before the page) restores it into a new session, :func:`end_run` (after the page, also when
it stopped or reran) saves it, so a reload or a second tab with the same URL finds the same work.
"""

from __future__ import annotations

import copy
import json
import logging
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
from ..workspace import Workspace, jsonable, new_id, prune_workspaces, valid_id

_LOG = logging.getLogger(__name__)
MODEL_KEY, DATA_KEY, PLAN_KEY = "studio_model_spec", "studio_data_spec", "studio_active_plan"
PLAN_SOURCE_KEY = "studio_active_plan_source"
WS_KEY, WS_STATE_KEY, WS_PRESENT_KEY = (
    "studio_workspace",
    "studio_workspace_state",
    "studio_workspace_present",
)
WS_MODEL_KEY = "studio_workspace_model"  # the model whose form values the session holds
GLOBAL_FORMS, MAX_MODEL_FORMS = "*", 8  # form values for any model (the picker's); models remembered
# what a page keeps in the session besides its widgets: the job it follows, its last result, what it computed.
# Saved in the workspace as JSON and restored as is (a value that is not plain JSON is skipped).
KEPT_KEYS = (
    "sls_job_run",
    "sls_last",
    "sls_embedded",
    "sls_suggested",
    "sls_keep_manual",
    "bb_run",
    "imp_last",
    "adapters_start_run",
    "adapters_runs",
    "prune_job_run",
    "prune_last",
    "retrain_start_run",
    "retrain_model",
    "bench_rows",
    "export_run",
    "model_speed",
)
# widget kinds whose value is an event or a file, never a setting: Streamlit refuses them being set
_NOT_FORM_VALUES = frozenset(
    {
        "trigger_value",
        "string_trigger_value",
        "json_trigger_value",
        "chat_input_value",
        "file_uploader_state_value",
    }
)


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


def workspace() -> Workspace:
    """This session's workspace: the one the URL names (``?ws=``), else a new one whose id goes into the URL.

    The id is kept in the session too: page switches may drop query parameters, and the URL gets it back."""
    ws_id = st.session_state.get(WS_KEY)
    if ws_id is None:
        asked = st.query_params.get("ws")
        ws_id = asked if valid_id(asked) else new_id()
        st.session_state[WS_KEY] = ws_id
        if ws_id != asked:  # a new workspace: the oldest beyond the cap make room
            prune_workspaces(runs_root(), spare=ws_id)
    if st.query_params.get("ws") != ws_id:
        st.query_params["ws"] = ws_id
    return Workspace.open(runs_root(), ws_id)


def _raw_state() -> Any:
    """The session's state without Streamlit's yield points.

    After ``st.stop()`` every access through ``st.session_state`` stops the script again, so the save in the
    entrypoint's ``finally`` reads the state object underneath; if that internal moved, the proxy (then a
    stopped page is saved on its next run instead)."""
    try:
        from streamlit.runtime.state import get_session_state

        inner = get_session_state()._state
        inner.filtered_state  # noqa: B018 (the attribute the save reads: check it is there)
        return inner
    except Exception:
        return st.session_state


def _get(ss: Any, key: str, default: Any = None) -> Any:
    return ss[key] if key in ss else default  # noqa: SIM401 (Streamlit's SessionState has no .get)


def _widget_kinds() -> dict[str, str]:
    """User key -> the value kind of the widget drawn with it (``bool_value``, ``trigger_value``…).

    Streamlit has no public way to tell a button from a checkbox by key; this reads its widget registry, and
    answers nothing (every bool then counts as a button, so nothing unsafe is restored) if that changes."""
    try:
        from streamlit.runtime.state import get_session_state

        inner = get_session_state()._state
        meta = inner._new_widget_state.widget_metadata
        ids = inner._key_id_mapper.id_key_mapping
        return {k: meta[w].value_type for w, k in ids.items() if w in meta}
    except Exception:  # an internal of Streamlit moved: fall back to the cautious rule above
        return {}


def _form_values(ss: Any) -> dict[str, Any]:
    """The session's widget values that are settings (not buttons, uploads or chart selections), by key."""
    kinds = _widget_kinds()
    out: dict[str, Any] = {}
    keys = ss.filtered_state.keys() if hasattr(ss, "filtered_state") else ss.keys()
    for key in list(keys):
        key = str(key)
        if key.startswith("studio_") or key.startswith("$$"):
            continue
        kind = kinds.get(key)
        if kind is None or kind in _NOT_FORM_VALUES:
            continue
        value = ss[key]
        if isinstance(value, tuple):
            value = list(value)
        if jsonable(value) and not isinstance(value, dict):
            out[key] = value
    return out


def begin_run() -> None:
    """Before the page: in a new session, restore the workspace (selection, active plan, kept values); every
    run, give widgets not drawn since (another page's) their saved values back, so they come back as left."""
    ws = workspace()
    saved = st.session_state.get(WS_STATE_KEY)
    if saved is None:
        saved = ws.load_state()
        st.session_state[WS_STATE_KEY] = saved
        with user_errors():  # a workspace of an older studio may not load: start afresh, say why
            if saved.get("model"):
                st.session_state[MODEL_KEY] = ModelSpec.from_dict(saved["model"])
            if saved.get("data"):
                st.session_state[DATA_KEY] = DataSpec.from_dict(saved["data"])
            if saved.get("plan"):
                plan = PrunePlan.from_dict(saved["plan"])
                set_active_plan(plan, source=saved.get("plan_source"))
        for key, value in saved.get("kept", {}).items():
            if key in KEPT_KEYS and key not in st.session_state:
                st.session_state[key] = value
    # Streamlit forgets a widget's value once a run does not draw it: the saved value stands in. Values are kept
    # per model (a slider's bounds follow the model's depth: another model's value could lie outside them)
    mkey = _model_key()
    if st.session_state.get(WS_MODEL_KEY) not in (None, mkey):  # the model changed in this session
        for key in _forms_of(saved, st.session_state[WS_MODEL_KEY]):
            if key in st.session_state:
                del st.session_state[
                    key
                ]  # the previous model's value: not for this one (its default instead)
    st.session_state[WS_MODEL_KEY] = mkey
    forms = {**saved.get("forms", {}).get(GLOBAL_FORMS, {}), **_forms_of(saved, mkey)}
    for key, value in forms.items():
        if key not in st.session_state:
            st.session_state[key] = value
    # which saved values the page starts with: one it removes (a reset) is then forgotten, not restored
    st.session_state[WS_PRESENT_KEY] = [k for k in forms if k in st.session_state]


def _model_key() -> str:
    return json.dumps(model_spec().to_dict(), sort_keys=True, default=str)


def _forms_of(saved: dict[str, Any], mkey: str) -> dict[str, Any]:
    held = saved.get("forms", {}).get(mkey, {})
    return held if isinstance(held, dict) else {}


def _is_global_form(key: str) -> bool:
    """Widgets whose value means the same for any model: the model and data picker's."""
    return key.startswith("pick_")


def end_run() -> None:
    """After the page (called from a ``finally``: also after ``st.stop``/``st.rerun``): save the session into
    the workspace; a write only happens when something changed. Reads the raw state (see :func:`_raw_state`)."""
    ss = _raw_state()
    saved = _get(ss, WS_STATE_KEY)
    if saved is None or _get(ss, WS_KEY) is None:
        return
    plan, held = _get(ss, PLAN_KEY), _get(ss, PLAN_SOURCE_KEY)
    source = None if plan is None or held is None or held[0].to_dict() != plan.to_dict() else held[1]
    forms = _form_values(ss)
    # Streamlit drops the widgets a run did not draw only after the run, so a saved key missing now was removed
    # by the page itself (a reset)
    removed = {k for k in _get(ss, WS_PRESENT_KEY, ()) if k not in ss}
    # a kept key drawn as a widget (a run picker) is a form value: merged like one, not dropped off-page
    kept = {k: ss[k] for k in KEPT_KEYS if k in ss and k not in forms}
    kept = {k: (sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in kept.items()}
    model, data = _get(ss, MODEL_KEY) or ModelSpec("demo"), _get(ss, DATA_KEY) or DataSpec("demo")
    mkey = _get(ss, WS_MODEL_KEY) or json.dumps(model.to_dict(), sort_keys=True, default=str)
    saved = {
        **saved,
        "model": model.to_dict(),
        "data": data.to_dict(),
        "plan": None if plan is None else plan.to_dict(),
        "plan_source": None if source is None else str(source),
        "forms": _merge_forms(saved, forms, removed, mkey),
        "kept": {k: v for k, v in kept.items() if v is not None and jsonable(v)},
    }
    ss[WS_STATE_KEY] = saved
    try:
        Workspace.open(runs_root(), ss[WS_KEY]).save_state(saved)
    except OSError as e:  # a full or read-only disk must not break the page; the session goes on in memory
        _LOG.warning("The workspace could not be saved: %s", e)


def _merge_forms(
    saved: dict[str, Any], current: dict[str, Any], removed: set[str], mkey: str
) -> dict[str, Any]:
    """The saved form values (global, and per model for the current model) updated with this run's values;
    values of at most ``MAX_MODEL_FORMS`` models are kept (the oldest go first)."""
    stored = {k: dict(v) for k, v in saved.get("forms", {}).items() if isinstance(v, dict)}
    for scope in (GLOBAL_FORMS, mkey):
        values = {k: v for k, v in stored.pop(scope, {}).items() if k not in removed}
        values.update({k: v for k, v in current.items() if _is_global_form(k) == (scope == GLOBAL_FORMS)})
        stored[scope] = values  # re-inserted last: the most recently used scope
    while len(stored) > MAX_MODEL_FORMS + 1:
        stored.pop(next(k for k in stored if k != GLOBAL_FORMS))
    return stored


class _NotStored(LookupError):
    """Raised inside the cached reader so that "not stored (yet)" is never cached."""


@st.cache_resource(max_entries=256, show_spinner=False)
def _read_analysis(folder: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    # a page reads its analyses on every rerun (12 embeddings per click on Layer separability): from disk once
    # per process, then from here. Shared read-only across sessions; a name always holds the same result
    held = Workspace(Path(folder)).get_analysis(name)
    if held is None:
        raise _NotStored(name)
    return held


def analysis(name: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A computed analysis stored in this session's workspace: ``(meta, arrays)`` (read-only), or None."""
    try:
        return _read_analysis(str(workspace().path), name)
    except _NotStored:
        return None


def keep_analysis(name: str, meta: dict[str, Any], arrays: dict[str, Any] | None = None) -> None:
    """Store a computed analysis in the workspace (bounded: the least recently used are evicted)."""
    try:
        workspace().put_analysis(name, meta, arrays)
    except (OSError, StudioError) as e:  # not kept: the page still has it; only a reload recomputes it
        st.toast(f"The analysis could not be kept in the workspace: {e}", icon=":material/warning:")


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
