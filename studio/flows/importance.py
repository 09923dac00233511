"""The importance flow: score every head, head dim, MLP neuron and embedding channel by each criterion
(weight magnitude, grouped Taylor as Isomorphic pruning ranks, SAViT's squared gate gradient, head ablation) as a
run -- with progress, cancel and a ``results.json`` like every other kind's.

At real size (DeiT-S, all five criteria) this takes minutes on a CPU, so the Importance page submits it as a job
(``python -m studio run RUN``) instead of scoring inline, and reads the scores back from the run. Nothing is
pruned: ``plan`` is null, ``before`` and ``after`` both hold the model's counted cost, and the flow's own section
(``results["importance"]``) is :meth:`ImportanceResult.to_dict` (the scores, Spearman vs ablation, samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..analysis.importance import ImportanceResult, ImportanceSpec, run_importance
from ..events import Callback, CancelToken
from ..models import LoadedModel
from ..runs import RunDir
from . import FLOWS, Flow
from .stages import analysis_flow, section_of


def _score(
    spec: ImportanceSpec, loaded: LoadedModel, callbacks: Sequence[Callback], cancel: CancelToken | None
) -> dict[str, Any]:
    return run_importance(spec, loaded=loaded, callbacks=callbacks, cancel=cancel).to_dict()


run_importance_flow = analysis_flow("importance", _score)


def importance_of(run: RunDir) -> ImportanceResult:
    """The scores a finished importance run recorded (refused, saying why, for any other run)."""
    return ImportanceResult.from_dict(section_of(run, "importance"))


FLOWS.add(
    "importance",
    Flow(
        "importance",
        ImportanceSpec,
        run_importance_flow,
        "score heads, head dims, MLP neurons and embedding channels by each criterion (no pruning)",
    ),
)
