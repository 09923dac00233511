"""Work too long for a page's script thread, run as a job of the page's own spec: find the run of exactly that
spec (a reload or a second tab follows the same job, never a second one), draw its live panel, and redraw the
whole page when it is done; otherwise offer to start it, saying how long it would take."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ..errors import StudioError
from ..flows import Spec
from ..jobs import job_status
from ..runs import RunDir, list_runs
from .jobs import device_picker, start_job_button
from .run_actions import follow
from .state import runs_root

# Work (multiply-accumulates) a page does inline, in its script thread: about 20 s on this project's 2-core CPU,
# which runs ~26 GMAC/s (docs/results/scale.md); more runs as a job with progress and cancel. On the demo the
# importance scoring (five criteria, 4 x 64 images) is ~0.13 TMAC and the default sensitivity sweep ~0.2 TMAC;
# DeiT-S at 224 px needs ~46 TMAC to score and ~4.6 TMAC for SLS's features of 1,000 images.
INLINE_MACS = 5e11


def run_of(spec: Spec, root: str | Path | None = None) -> RunDir | None:
    """The newest run of exactly ``spec`` under the runs folder (any state)."""
    want = spec.to_dict()
    for run in list_runs(root or runs_root()):
        try:
            if run.spec() == want:
                return run
        except (OSError, ValueError, StudioError):
            continue  # a damaged spec.json is the Runs page's to report, not a match
    return None


def finished(spec: Spec) -> RunDir | None:
    """The newest run of ``spec`` that is done (its results are there to read), or None."""
    run = run_of(spec)
    return run if run is not None and job_status(run.path).state == "done" and run.results() else None


def offer_job(
    spec: Spec, *, key: str, label: str, why: str, waiting: str, device_key: str | None = None
) -> None:
    """Follow the running job of ``spec``, or explain ``why`` it runs as a job and offer the ``label`` button.

    Args:
        waiting: what the page shows while the job runs (what appears when it is done).
        device_key: draw a device picker (keyed so) beside the button, for work worth a GPU; else the CPU.
    """
    run = run_of(spec)
    if run is not None and job_status(run.path).active:
        st.info(waiting, icon=":material/hourglass:")
        follow(run.path)  # its panel redraws the page when the job is done
        return
    st.info(why, icon=":material/schedule:")
    if run is not None:
        follow(run.path)  # the last attempt, cancelled or failed: its panel says what happened
    device = device_picker(device_key)[0] if device_key else "cpu"
    if start_job_button(label, spec, key=key, device=device) is not None:
        st.rerun()
