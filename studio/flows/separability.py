"""The separability flow: SLS's per-layer analysis (Han & Tang, ECCV 2024) -- every block's CLS tokens over the
analysis set, the fast kNN / silhouette curve, the 2-D embedding of each layer scored by the silhouette, and the
α depth cut -- as a run with progress and cancel.

At real size (DeiT-S, 1,000 images at 224 px, a t-SNE per layer) this takes minutes on a CPU, so the Layer
separability page runs it as a job: the job fills the feature bank and the per-layer embedding caches on disk
(:mod:`studio.features`, :func:`studio.analysis.separability.embed_layer`), and the page then reads them in a
moment. Nothing is pruned: ``plan`` is null, ``before``/``after`` hold the model's counted cost, and the flow's
section (``results["separability"]``) is :meth:`SeparabilityResult.to_dict` (per-layer scores and the cut).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..analysis.separability import SeparabilitySpec, analyze
from ..events import Callback, CancelToken
from ..load import load_model
from ..models import LoadedModel
from ..runs import RunDir
from . import FLOWS, Flow
from .stages import COST_ONLY, RunResult, finish


def run_separability(
    spec: SeparabilitySpec,
    *,
    run: RunDir | None,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    resume: bool = False,
) -> RunResult:
    """Analyse every layer of ``spec.model`` and write the scores and the cut (a rerun reads the disk caches)."""
    t0 = time.time()
    loaded = loaded or load_model(spec.model)
    result = analyze(spec, loaded=loaded, callbacks=callbacks, cancel=cancel)
    return finish(
        kind="separability",
        method="sls",
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


FLOWS.add(
    "separability",
    Flow(
        "separability",
        SeparabilitySpec,
        run_separability,
        "SLS's per-layer CLS separability (kNN, silhouettes of 2-D embeddings) and the α depth cut (no pruning)",
    ),
)
