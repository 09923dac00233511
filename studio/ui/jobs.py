"""Background jobs in the studio: a button that starts one, and a panel that follows one live.

The job itself is a separate process (:mod:`studio.jobs`); these widgets only read its run folder, so a page
reload, a closed tab or another browser shows the same job. :func:`job_panel` is a fragment re-running every
two seconds on its own (the rest of the page stays still): status, progress and ETA, device and memory,
live loss/accuracy curves from ``events.jsonl``, Cancel / Stop now / Resume buttons and the log.

Ownership (see :mod:`studio.jobs`): every browser session has a random token (:func:`session_token`), kept in
its session state and in the page URL (``?owner=...``, so a reload keeps it; sharing the URL shares it). A job
started here records the token's digest; Cancel, Stop now and Resume are drawn, and carried out, only for the
session that holds the run's token. Every other session sees the run read-only; the CLI can act on any job.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch
from plotly.subplots import make_subplots

from .. import jobs, safety, threads
from ..errors import StudioError
from ..flows import Spec, new_run_dir
from ..runs import JOB_FILE, RunDir, read_json
from . import charts
from .state import runs_root, user_errors

STATE_ICONS = {
    "created": ":material/draft:",
    "queued": ":material/schedule:",
    "starting": ":material/hourglass_top:",
    "running": ":material/progress_activity:",
    "cancelling": ":material/hourglass_bottom:",
    "done": ":material/check_circle:",
    "failed": ":material/error:",
    "cancelled": ":material/pause_circle:",
}
_MSG_KEY = "studio_job_message"
OWNER_KEY = "studio_owner_token"
OWNER_PARAM = "owner"  # the URL query parameter that keeps the token over a reload
_TOKEN = re.compile(r"[0-9a-f]{32}")
THREADS_KEY = "studio_job_threads"  # the sidebar's "Threads per job" (0: the policy of studio.threads)


@st.cache_data(ttl=3, show_spinner=False)
def running_threads(root: str) -> list[int]:
    """The CPU threads each running job under ``root`` holds (``threads`` × processes, from its ``job.json``)."""
    out = []
    for s in jobs.list_jobs(root):
        if s.active:
            try:
                job = read_json(Path(s.run) / JOB_FILE)
            except StudioError:
                continue
            out.append(int(job.get("threads") or 1) * max(1, s.nproc))
    return out


def job_threads(nproc: int = 1) -> int:
    """Threads for each process of a job started now: the sidebar's setting, else the policy (what the server
    and the running jobs leave; :func:`studio.threads.job_threads`)."""
    asked = int(st.session_state.get(THREADS_KEY) or 0) or None
    return threads.job_threads(running_threads(str(runs_root())), nproc=nproc, asked=asked)


def apply_server_threads() -> int:
    """Size the server's own torch thread pool beside the running jobs (process-wide; cheap when unchanged)."""
    n = threads.server_threads(running_threads(str(runs_root())))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def session_token() -> str:
    """This browser session's owner token: from the session, else the URL's ``?owner=`` (a reload), else new.

    Written back to the URL so that a reload (a new session) finds it again. Only a well-formed token is taken
    from the URL: anything else gets a fresh one (a guessed short value must not stand for anyone's runs)."""
    token = st.session_state.get(OWNER_KEY)
    if not token:
        given = st.query_params.get(OWNER_PARAM, "")
        token = given if isinstance(given, str) and _TOKEN.fullmatch(given) else secrets.token_hex(16)
        st.session_state[OWNER_KEY] = token
    if st.query_params.get(OWNER_PARAM) != token:
        st.query_params[OWNER_PARAM] = token
    return token


def mine(status_or_row: jobs.JobStatus | Mapping) -> bool:
    """Whether this session started the run (a :class:`JobStatus` or a :func:`studio.jobs.run_summary` row)."""
    owner = status_or_row.get("owner") if isinstance(status_or_row, Mapping) else status_or_row.owner
    return owner is not None and owner == jobs.owner_id(session_token())


def device_picker(key: str) -> tuple[str, int]:
    """Device and number of processes for a job; the GPU count appears only when several GPUs are visible."""
    options = jobs.devices()
    c1, c2 = st.columns([2, 1])
    device = c1.selectbox(
        "Device", options, index=len(options) - 1 if len(options) > 1 else 0, key=f"{key}_device"
    )
    nproc = 1
    n_gpus = len(options) - 1
    if device.startswith("cuda") and n_gpus > 1:
        first = int(device.partition(":")[2] or 0)
        nproc = int(
            c2.number_input(
                "GPUs (torchrun, DDP)",
                1,
                n_gpus - first,
                1,
                key=f"{key}_nproc",
                help="More than one starts the job under torchrun, one process per GPU.",
            )
        )
    return device, nproc


def start_job_button(
    label: str,
    spec: Spec,
    *,
    key: str,
    device: str = "cpu",
    nproc: int = 1,
    root: Path | None = None,
    disabled: bool = False,
    field_names: Mapping[str, str] | None = None,
) -> Path | None:
    """A primary button submitting ``spec`` as a job (``python -m studio run RUN``) in a new run folder.

    The spec is validated first: a bad combination, or a model/teacher/data path the server may not read
    (:func:`studio.safety.guard_spec`, named as ``field_names`` maps spec fields to their widgets' labels), is a
    message beside the button (which is then disabled), never a job that fails. Returns the new run folder when the button started a job in this script run, else
    None. The last one started from this key is kept in ``st.session_state[f"{key}_run"]`` for the page.
    """
    try:
        spec.validate()
        safety.guard_spec(spec, names=field_names)
        problem = None
    except StudioError as e:
        problem = str(e)
    if problem:
        st.error(problem, icon=":material/error:")
    if not st.button(
        label, type="primary", key=key, disabled=disabled or problem is not None, icon=":material/play_arrow:"
    ):
        return None
    run = new_run_dir(root or runs_root(), spec)
    with user_errors():
        # a busy device queues the job behind the running one instead of refusing it
        s = jobs.submit(
            spec,
            run,
            device=device,
            nproc=nproc,
            threads=job_threads(nproc),
            owner=session_token(),
            queue=True,
        )
        running_threads.clear()  # the next share counts this job
        st.session_state[f"{key}_run"] = str(run)
        if s.state == "queued":
            st.toast(f"Queued {run.name}: it starts when {device} is free", icon=":material/schedule:")
        else:
            st.toast(f"Started {run.name}", icon=":material/play_arrow:")
        return run
    return None


def _act(action: str, run_dir: str) -> None:
    """Button callbacks (they run before the fragment redraws, so it shows the new state)."""
    token = session_token()  # the engine checks it too: a stale button of another session is refused
    try:
        if action == "cancel":
            jobs.cancel_job(run_dir, owner=token)
        elif action == "stop":
            jobs.cancel_job(run_dir, force=True, owner=token)
        elif action == "resume":
            jobs.resume_job(run_dir, threads=job_threads(jobs.job_status(run_dir).nproc), owner=token)
            running_threads.clear()
        st.session_state.pop(_MSG_KEY, None)
    except StudioError as e:
        st.session_state[_MSG_KEY] = str(e)


def curves_figure(run_dir: str | Path) -> go.Figure | None:
    """Training loss per logged step, and per-epoch train loss and validation accuracy (None before any)."""
    data = jobs.curves(run_dir)
    steps, epochs = pd.DataFrame(data["steps"]), pd.DataFrame(data["epochs"])
    if steps.empty and epochs.empty:
        return None
    if not epochs.empty:  # records count epochs from 0; the page says "epoch 1 / N" (and so do the overlays)
        epochs["epoch"] = epochs["epoch"] + 1
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("Training loss", "Per epoch"), specs=[[{}, {"secondary_y": True}]]
    )
    if not steps.empty:
        fig.add_trace(
            go.Scatter(
                x=steps["step"],
                y=steps["loss"],
                mode="lines",
                name="loss (step)",
                line=dict(color=charts.COLORS["muted"]),
                hovertemplate=charts.hover("step %{x}", loss="%{y:.4f}"),
            ),
            row=1,
            col=1,
        )
    if not epochs.empty:
        fig.add_trace(
            go.Scatter(
                x=epochs["epoch"],
                y=epochs["train_loss"],
                mode="lines+markers",
                name="train loss",
                line=dict(color=charts.COLORS["pruned"]),
                hovertemplate=charts.hover("epoch %{x}", train_loss="%{y:.4f}"),
            ),
            row=1,
            col=2,
        )
        if "val_top1" in epochs:
            fig.add_trace(
                go.Scatter(
                    x=epochs["epoch"],
                    y=epochs["val_top1"],
                    mode="lines+markers",
                    name="val top-1",
                    line=dict(color=charts.COLORS["recovered"]),
                    hovertemplate=charts.hover("epoch %{x}", val_top1="%{y:.2%}"),
                ),
                row=1,
                col=2,
                secondary_y=True,
            )
            fig.update_yaxes(tickformat=".1%", row=1, col=2, secondary_y=True)
    fig = charts.style(fig, height=320)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0))
    fig.update_layout(margin=dict(t=40, b=60))
    fig.update_xaxes(title="step", row=1, col=1)
    fig.update_xaxes(title="epoch", row=1, col=2)
    return fig


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


_SEEN_KEY = "studio_jobs_seen_active"  # run folder -> whether the panel last saw its job active


@st.fragment(run_every="2s")
def job_panel(run_dir: str | Path) -> None:
    """Follow one job live (re-runs every 2 s): status, progress, ETA, device, memory, curves, controls."""
    run_dir = str(run_dir)
    try:
        s = jobs.job_status(run_dir)
    except StudioError as e:
        st.error(str(e))
        return
    key = f"job_{s.name}"
    # a job that ends while the panel follows it: redraw the whole page once, so what the page shows of a
    # finished run (its result, Make active / Retrain / Export) appears without a click -- a fragment alone
    # only redraws itself
    seen = st.session_state.setdefault(_SEEN_KEY, {})
    was_active, seen[run_dir] = seen.get(run_dir), s.active
    if was_active and not s.active:
        st.rerun()
    # any flow's checkpoint counts (P3B's and SPLoRA's phase files too, not only checkpoint.pt)
    resumable = s.resumable or (s.state in ("cancelled", "failed") and RunDir(run_dir).has_checkpoint)
    st.markdown(
        f"{STATE_ICONS.get(s.state, '')} **{s.name}** · {s.state}"
        + (f" · attempt {s.attempt}" if s.attempt > 1 else "")
    )
    c = st.columns(4)
    p = s.progress or {}
    epoch = f"{int(p['epoch']) + 1}" if "epoch" in p else "–"
    c[0].metric("Epoch", f"{epoch} / {s.epochs}" if s.epochs and "epoch" in p else epoch)
    c[1].metric("ETA", _eta(s.eta_s))
    c[2].metric("Device", (s.device or "–") if s.nproc == 1 else f"{s.nproc}× {s.device}")
    mem = "–" if s.rss_mb is None else charts.human(s.rss_mb * 2**20, "B")
    if s.gpu_mem_mb:
        mem += f" · GPU {charts.human(s.gpu_mem_mb * 2**20, 'B')}"
    c[3].metric("Memory", mem)
    if p.get("total"):
        done, total = int(p.get("done", 0)), int(p["total"])
        label = f"{p.get('task', '')} {done}/{total}" + (f" · loss {p['loss']:.4f}" if "loss" in p else "")
        st.progress(min(1.0, done / max(1, total)), text=label)
    if s.state == "failed":
        st.error(f"Failed: {s.error}", icon=":material/error:")
    elif s.state == "cancelled":
        st.warning(
            "Cancelled: a checkpoint was saved; Resume continues from it." if resumable else "Cancelled.",
            icon=":material/pause:",
        )
    elif s.state == "done":
        st.success("Done.", icon=":material/check_circle:")
    elif s.state == "queued":
        jobs.dispatch(Path(run_dir).parent)  # the device may have freed with no launcher left to say so
        behind = Path(s.waiting_for).name if s.waiting_for else "another job"
        st.info(
            f"Queued: it starts on {s.device or 'its device'} when {behind} ends. Cancel takes it out of the "
            "queue.",
            icon=":material/schedule:",
        )
    msg = st.session_state.get(_MSG_KEY)
    if msg:
        st.error(msg)
    b = st.columns([1, 1, 1, 3])
    owned = mine(s)
    if not owned and (s.active or resumable):
        b[3].caption(
            ":material/visibility: Read-only: another browser session (or the command line) started this job, "
            "so only it can cancel or resume it (on the server: `python -m studio jobs cancel RUN`)."
        )
    if s.active and owned:
        b[0].button(
            "Cancel",
            key=f"{key}_cancel",
            on_click=_act,
            args=("cancel", run_dir),
            icon=":material/stop_circle:",
            help="Saves a checkpoint at the next training step and stops; Resume continues from it.",
            disabled=s.state == "cancelling",
        )
        b[1].button(
            "Stop now",
            key=f"{key}_stop",
            on_click=_act,
            args=("stop", run_dir),
            icon=":material/cancel:",
            help="Also sends SIGTERM to the job's processes.",
        )
    if resumable and owned:
        b[2].button(
            "Resume", key=f"{key}_resume", on_click=_act, args=("resume", run_dir), icon=":material/replay:"
        )
    fig = curves_figure(run_dir)
    if fig is not None:
        st.plotly_chart(fig, key=f"{key}_curves", config={"displaylogo": False})
    events = jobs.recent_events(run_dir)
    with st.expander("Events and log"):
        shown = [e for e in events if e.get("kind") in ("status", "log", "metric")][-30:]
        rows = [
            {
                "kind": e["kind"],
                **{k: v for k, v in e.get("data", {}).items() if not isinstance(v, dict | list)},
            }
            for e in shown
        ]
        st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"{key}_events")
        st.code(jobs.read_log(run_dir, lines=40) or "(empty log)", language="text")
