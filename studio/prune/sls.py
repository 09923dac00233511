"""SLS — Straightforward Layer-wise Pruning (Han & Tang, ECCV 2024, arXiv 2407.14330): a depth cut chosen
from per-layer CLS separability, then retraining of the head (and adapters).

- The cut: :func:`sls_plan` keeps blocks ``0..L*-1`` (the paper's layers ``1..L*``); the patch embedding, the
  final norm and the classifier are **reused** as they are (no new head), exactly as in the paper. ``L*`` comes
  from the α rule (:mod:`studio.analysis.sls_cut`) on the per-layer t-SNE silhouette curve
  (:mod:`studio.analysis.separability`), or is given (``keep_blocks``, e.g. from the studio's slider).
- Registered as method ``sls`` in :data:`studio.prune.METHODS` (``python -m studio prune --method sls``); its
  analysis set is ``samples`` (default 1,000, the paper's and the Layer separability analysis's size) images of
  the calibration split: the flow draws enough calibration batches for them unless ``--calib-batches`` says
  otherwise, and the first ``samples`` of the (seeded, shuffled) draw are analysed.
- :func:`run_sls` is the whole paper pipeline in one call: analysis → cut → accuracy of the cut model →
  retraining → accuracy and measured throughput (batch 1 with the paper's 50 warm-up / 100 timed passes, and a
  large batch) → export. Used by the studio's Layer separability page and ``bench/sls_demo.py``.

Retraining follows the SLS recipe (``paper:sls`` in :mod:`studio.recovery`: AdamW lr 1e-3, wd 1e-4, cosine with
10 warm-up epochs to 1e-5, batch 64, 100 epochs; ``cpu`` shortens it to 20 epochs with 2 warm-up epochs). What
trains: adapters + head for a PETL model (the paper); a fully fine-tuned model has no adapters, so it retrains
head + final norm (optionally the last kept block, or fresh LoRA or Convpass adapters) — an adaptation, not in
the paper.
Model selection uses the **validation** split; the paper's code reports the best of ten **test** evaluations
(pitfall P7), which overstates accuracy — the studio never selects on test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..analysis.separability import SeparabilitySpec, analyze_features, features_from_bank
from ..analysis.sls_cut import DEFAULT_ALPHA
from ..costs import plan_cost
from ..data import TensorData
from ..errors import StudioError
from ..events import Callback, CancelToken, emit
from ..features import extract
from ..models import LoadedModel
from ..petl import ADAPTER_TRAINABLE, has_adapters
from ..plan import BaseArch, BlockPlan, PrunePlan
from ..recovery import resolve_recipe
from . import METHODS, Budget, Method, Option, PruneRequest

RETRAIN_PRESETS = ("paper", "cpu", "none")
TRAINABLE = ("auto", "head", "head+norm", "head+norm+last", "adapters", "lora", "convpass")
PAPER_SELECTION_NOTE = (
    "The SLS paper's code reports the best of ten test-set evaluations during retraining (model selection on "
    "test); the studio selects the retrained model on the validation split and reports test once."
)


# --------------------------------------------------------------------------------------------------- plan
def sls_plan(base: BaseArch, keep: int, *, params: Mapping[str, Any] | None = None) -> PrunePlan:
    """The depth cut as a plan: blocks ``0..keep-1`` kept whole; embedding, final norm and head reused."""
    if not isinstance(keep, int) or not 1 <= keep <= base.depth:
        raise StudioError(f"SLS keeps between 1 and {base.depth} blocks, got {keep!r}.")
    return PrunePlan(
        base=base,
        blocks=tuple(BlockPlan(i) for i in range(keep)),
        method="sls",
        params={"keep": keep, **dict(params or {})},
    ).validate()


def preview_cut(loaded: LoadedModel, keep: int, *, base_images_per_s: float | None = None) -> dict[str, Any]:
    """Params and MACs of the cut model (analytic, exact) and an estimated throughput, without building it.

    The estimate scales a measured base throughput by the MACs ratio (ideal: the real gain is usually lower).
    """

    dense = plan_cost(PrunePlan.dense(loaded.base))
    cut = plan_cost(sls_plan(loaded.base, keep))
    out: dict[str, Any] = {
        "keep": keep,
        "removed": loaded.base.depth - keep,
        "params": cut["params"],
        "macs": cut["macs"],
        "params_dense": dense["params"],
        "macs_dense": dense["macs"],
        "params_fraction": cut["params"] / dense["params"],
        "macs_fraction": cut["macs"] / dense["macs"],
        "ideal_speedup": dense["macs"] / cut["macs"],
    }
    if base_images_per_s is not None:
        out["est_images_per_s"] = base_images_per_s * out["ideal_speedup"]
    return out


# --------------------------------------------------------------------------------------- registered method
SAMPLES = (
    1000  # images SLS analyses: the paper's ~1,000 (its training loader), as the Layer separability page
)


def uses_data(p: Mapping[str, Any]) -> bool:
    """The α rule scores layers on labelled images; a given ``keep_blocks`` cut needs none."""
    return not p.get("keep_blocks")


def _plan_sls(req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None):

    p = dict(req.params)
    keep = int(p.get("keep_blocks") or 0)
    common = {
        "alpha": p["alpha"],
        "embed": p["embed"],
        "perplexity": p["perplexity"],
        "seed": req.seed,
    }
    if keep:
        return sls_plan(req.loaded.base, keep, params={**common, "keep_blocks": keep, "rule": "given"})
    if not req.batches:
        raise StudioError("SLS needs labelled data to score the layers: give --data (or --keep-blocks N).")
    n = int(p.get("samples") or SAMPLES)
    x = torch.cat([b[0].detach().cpu() for b in req.batches])[:n]  # the batches are a seeded shuffled draw
    y = torch.cat([torch.as_tensor(b[1]).detach().cpu() for b in req.batches])[:n]
    bank = extract(req.loaded.model, TensorData(x, y), callbacks=callbacks, cancel=cancel)
    feats = features_from_bank(
        bank.cls.numpy(), bank.labels.numpy(), class_names=req.loaded.class_names, split="calibration"
    )
    spec = SeparabilitySpec(
        embed=p["embed"], alpha=p["alpha"], perplexity=p["perplexity"], seed=req.seed, lazy=bool(p["lazy"])
    )
    res = analyze_features(feats, spec, callbacks=callbacks, cancel=cancel)
    cut = res.suggested
    emit(callbacks, "log", message=cut.reason)
    return sls_plan(
        req.loaded.base,
        cut.keep,
        params={
            **common,
            "keep_blocks": None,
            "rule": "alpha",
            "lazy": bool(p["lazy"]),
            "samples": res.samples,
            "curve": list(res.silhouette),
            "knn": list(res.fast.knn),
            "silhouette_hd": list(res.fast.silhouette_hd),
            "scored_on": "silhouette" if res.cut is not None else "silhouette_hd",
            "reason": cut.reason,
            "versions": res.versions,
        },
    )


METHODS.add(
    "sls",
    Method(
        "sls",
        _plan_sls,
        "SLS (Han & Tang, ECCV 2024): cut the last blocks where per-layer CLS separability falls below α·SC_last",
        options=(
            Option(
                "alpha",
                float,
                DEFAULT_ALPHA,
                "SLS threshold factor: keep layers scoring >= alpha * last layer's score",
            ),
            Option("keep_blocks", int, 0, "SLS: blocks to keep, overriding the alpha rule (0: use the rule)"),
            Option(
                "embed",
                str,
                "tsne",
                "SLS 2-D embedding scored by the silhouette (none: fast high-dim score)",
                choices=("tsne", "umap", "pca", "none"),
            ),
            Option("perplexity", float, 30.0, "SLS t-SNE perplexity (paper: 30)"),
            Option(
                "lazy", bool, False, "SLS: embed only the layers the top-down scan reads, as the paper's code"
            ),
            Option(
                "samples",
                int,
                SAMPLES,
                "SLS: images of the calibration split analysed (paper and analysis: ~1,000)",
                low=10,
            ),
        ),
        needs_data=uses_data,
        calib_need=lambda p, batch_size: math.ceil(int(p.get("samples") or SAMPLES) / batch_size),
        budgets=(
            Budget(
                "alpha",
                "α: keep the blocks scoring at least α x the last block's separability",
                0.05,
                1.0,
                DEFAULT_ALPHA,
                0.05,
            ),
            Budget("keep_blocks", "Blocks to keep (a depth cut)", 1, None, 6, 1),
        ),
        rounds=False,
        calibration="forward",
        units=("blocks", "embed"),
    ),
)


# ------------------------------------------------------------------------------------------ retraining
def trainable_rule(kind: str, keep: int, model: torch.nn.Module) -> str:
    """The ``TrainSpec.trainable`` rule of a retraining choice on a model cut to ``keep`` blocks."""

    if kind == "auto":
        kind = "adapters" if has_adapters(model) else "head+norm"
    heads = r"^(head|head_dist|fc_norm)\."
    rules = {
        "head": "re:" + heads,
        "head+norm": r"re:^(head|head_dist|fc_norm|norm)\.",
        "head+norm+last": rf"re:^(head|head_dist|fc_norm|norm)\.|^blocks\.{keep - 1}\.",
        "adapters": ADAPTER_TRAINABLE,
        "lora": ADAPTER_TRAINABLE,
        "convpass": ADAPTER_TRAINABLE,
    }
    if kind not in rules:
        raise StudioError(f"Unknown retraining choice '{kind}': use one of {', '.join(TRAINABLE)}.")
    if kind == "adapters" and not has_adapters(model):
        raise StudioError(
            "This model has no adapters to retrain. Use trainable 'head+norm' (fully fine-tuned models), "
            "'lora' or 'convpass' (add fresh adapters to the kept blocks)."
        )
    return rules[kind]


def retrain_train_spec(preset: str, *, trainable: str, epochs: int | None = None, seed: int = 0):
    """The SLS recipe (``paper:sls`` of :mod:`studio.recovery`) as a ``TrainSpec``; ``cpu`` is its short form."""

    if preset not in RETRAIN_PRESETS or preset == "none":
        raise StudioError(f"Unknown SLS retraining preset '{preset}': use paper or cpu (or none to skip).")
    over: dict[str, Any] = {"trainable": trainable}
    if preset == "cpu":
        over.update(epochs=20, warmup_epochs=2)
    if epochs is not None:
        over.update(epochs=epochs, warmup_epochs=max(1, round(epochs / 10)))
    return resolve_recipe("paper:sls", "sls", over).train_spec(seed=seed)
