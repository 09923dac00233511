"""The importance flow: score every head, head dim, MLP neuron and embedding channel by each criterion
(weight magnitude, grouped Taylor as Isomorphic pruning ranks, SAViT's squared gate gradient, head ablation) as a
run -- with progress, cancel and a ``results.json`` like every other kind's.

At real size (DeiT-S, all five criteria) this takes minutes on a CPU, so the Importance page submits it as a job
(``python -m studio run RUN``) instead of scoring inline, and reads the scores back from the run. Nothing is
pruned: ``plan`` is null, ``before`` and ``after`` both hold the model's counted cost, and the flow's own section
(``results["importance"]``) is :meth:`ImportanceResult.to_dict` (the scores, Spearman vs ablation, samples).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..analysis.importance import ImportanceResult, ImportanceSpec, run_importance
from ..errors import StudioError
from ..events import Callback, CancelToken
from ..load import load_model
from ..models import LoadedModel
from ..runs import RunDir
from . import FLOWS, Flow
from .stages import COST_ONLY, RunResult, finish


def run_importance_flow(
    spec: ImportanceSpec,
    *,
    run: RunDir | None,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    resume: bool = False,
) -> RunResult:
    """Score ``spec.criteria`` on ``spec.model`` over its calibration batches and write the run's results."""
    t0 = time.time()
    loaded = loaded or load_model(spec.model)
    result = run_importance(spec, loaded=loaded, callbacks=callbacks, cancel=cancel)
    return finish(
        kind="importance",
        method="importance",
        loaded=loaded,
        model=loaded.model,
        plan=None,
        how=COST_ONLY,
        run=run,
        started=t0,
        section=result.to_dict(),
        callbacks=callbacks,
        cancel=cancel,
    )


def importance_of(run: RunDir) -> ImportanceResult:
    """The scores a finished importance run recorded (refused, saying why, for any other run)."""
    res = run.results() or {}
    if res.get("kind") != "importance" or not isinstance(res.get("importance"), dict):
        raise StudioError(f"{run.path} is not a finished importance run: it has no scores to read.")
    return ImportanceResult.from_dict(res["importance"])


FLOWS.add(
    "importance",
    Flow(
        "importance",
        ImportanceSpec,
        run_importance_flow,
        "score heads, head dims, MLP neurons and embedding channels by each criterion (no pruning)",
    ),
)
