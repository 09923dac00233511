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

from collections.abc import Sequence
from typing import Any

from ..analysis.separability import SeparabilitySpec, analyze
from ..events import Callback, CancelToken
from ..models import LoadedModel
from . import FLOWS, Flow
from .stages import analysis_flow


def _analyse(
    spec: SeparabilitySpec, loaded: LoadedModel, callbacks: Sequence[Callback], cancel: CancelToken | None
) -> dict[str, Any]:
    return analyze(spec, loaded=loaded, callbacks=callbacks, cancel=cancel).to_dict()


run_separability = analysis_flow("separability", _analyse)


FLOWS.add(
    "separability",
    Flow(
        "separability",
        SeparabilitySpec,
        run_separability,
        "SLS's per-layer CLS separability (kNN, silhouettes of 2-D embeddings) and the α depth cut (no pruning)",
    ),
)
