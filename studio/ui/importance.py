"""The Importance page's view-model: method plans at any budget, the active plan pruned, a retraining job.

No Streamlit here (the page draws); engine work goes through the one spec form: pruning the active plan is a
:class:`~studio.flows.prune.PruneSpec` with the plan given, run inline by :func:`studio.flows.start`;
retraining its export is a :class:`~studio.flows.retrain.RecoverySpec` submitted as a job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import jobs
from ..analysis.criteria import Batch, accumulate_gradients
from ..analysis.gate_scores import SavitScores, savit_scores
from ..analysis.importance import CRITERIA, ImportanceSpec
from ..bench import measure_throughput
from ..costs import plan_cost, with_summary
from ..data import DataSpec
from ..events import Callback, CancelToken
from ..flows import start
from ..flows.prune import PruneSpec
from ..flows.retrain import RecoverySpec
from ..models import LoadedModel, ModelSpec
from ..plan import BaseArch, PrunePlan
from ..prune import PruneRequest, make_plan
from ..prune.isomorphic import DEFAULT_RATIOS, IsoRatios, solve_scale
from ..prune.savit import savit_plan
from ..recovery import infer_teacher
from ..runs import RunDir

OVERLAY_METHODS = ("savit", "isomorphic", "magnitude", "random")

BACKWARD = 3.0  # a forward and a backward pass cost about three forwards


def scoring_macs(base: BaseArch, criteria: Sequence[str], images: int, ablation_images: int = 0) -> float:
    """About how many MACs scoring ``criteria`` on ``images`` calibration images takes (the page's
    inline-or-job choice). Magnitudes are free; Taylor and SAViT's taylor2 share one forward+backward pass per
    image; ablation costs about half a forward per head on each image it uses (the tokens entering a block are
    computed once, the rest of the model runs per ablated head)."""
    forward = plan_cost(PrunePlan.dense(base))["macs"]
    names = set(criteria)
    total = BACKWARD * forward * images if names & {"taylor", "taylor2"} else 0.0
    if "ablation" in names:
        used = images if ablation_images <= 0 else min(images, ablation_images)
        total += 0.5 * forward * used * sum(base.num_heads)
    others = [n for n in names - {"taylor", "taylor2", "ablation"} if CRITERIA.get(n).needs_data]
    return total + BACKWARD * forward * images * len(
        others
    )  # a criterion registered later: a pass of its own


def macs_per_second(loaded: LoadedModel, images: int = 2) -> float:
    """This machine's measured forward rate for ``loaded``'s model, by the studio's throughput protocol (one
    warm-up, one timed pass of ``images`` images): what turns :func:`scoring_macs` into the page's estimate."""
    r = measure_throughput(
        loaded.model, loaded.data_config["input_size"], batch_size=images, warmup=1, repeats=1
    )
    return plan_cost(PrunePlan.dense(loaded.base))["macs"] * r.images_per_s


def importance_spec(
    model: ModelSpec,
    data: DataSpec,
    criteria: Sequence[str],
    batches: int,
    *,
    ablation_samples: int = 0,
) -> ImportanceSpec:
    """The one form of the page's scoring, inline or as a job (64-image calibration batches)."""
    return ImportanceSpec(
        model=model,
        data=data,
        criteria=tuple(sorted(criteria)),
        batches=int(batches),
        batch_size=64,
        ablation_samples=int(ablation_samples),
    )


class MethodPlanner:
    """Plans of several methods at any MACs budget for one model, each method's calibration work done once.

    Isomorphic's summed gradients and SAViT's scores (with the Hessian) are computed on first use and kept, so
    moving a budget slider only re-runs the cheap part (the pruner's ranking / SAViT's allocation). Plans are
    memoised per (method, target), at most ``max_plans`` of them. One instance per session and model: it holds
    no shared state.
    """

    def __init__(self, loaded: LoadedModel, batches: Sequence[Batch], *, seed: int = 0, max_plans: int = 64):
        self.loaded, self.batches, self.seed, self.max_plans = loaded, list(batches), seed, max_plans
        self._grads: dict[str, torch.Tensor] | None = None
        self._savit: SavitScores | None = None
        self._plans: dict[tuple[str, float], PrunePlan] = {}

    def plan(
        self,
        method: str,
        target: float,
        *,
        callbacks: Sequence[Callback] = (),
        cancel: CancelToken | None = None,
    ) -> PrunePlan:
        """The plan ``method`` makes to keep ``target`` of the MACs (summary filled)."""
        key = (method, round(float(target), 4))
        if key not in self._plans:
            if len(self._plans) >= self.max_plans:  # bounded: the oldest plan goes first
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = with_summary(self._make(method, float(target), callbacks, cancel))
        return self._plans[key]

    def _make(
        self, method: str, target: float, callbacks: Sequence[Callback], cancel: CancelToken | None
    ) -> PrunePlan:
        loaded, base = self.loaded, self.loaded.base
        if method == "isomorphic":
            if self._grads is None:
                self._grads = accumulate_gradients(
                    loaded.model, self.batches, callbacks=callbacks, cancel=cancel
                )
            st, _, _ = solve_scale(
                loaded.model,
                base,
                self._grads,
                IsoRatios(*DEFAULT_RATIOS),
                target,
                params={"target_macs": target},
                callbacks=callbacks,
                cancel=cancel,
            )
            return st.plan
        if method == "savit":
            if self._savit is None:
                self._savit = savit_scores(
                    loaded.model, base, self.batches, seed=self.seed, callbacks=callbacks, cancel=cancel
                )
            plan, _ = savit_plan(base, self._savit, target, params={"target_macs": target})
            return plan
        return make_plan(
            method,
            PruneRequest(loaded, {"target_macs": target}, self.batches, self.seed),
            callbacks=callbacks,
            cancel=cancel,
        )


def net_edits(edits: Sequence[str]) -> list[str]:
    """The hand edits that still change the plan: a toggle back (drop then keep the same unit) cancels the edit
    it undoes instead of counting as a second one.

    A head's note names it exactly (``block 3 head 1 drop``), so its undo cancels wherever it is in the history;
    a neuron bin's note names only how many neurons (``block 3 24 MLP neurons drop``), so it cancels only the
    edit right before it, the one a toggle back undoes.
    """
    kept: list[str] = []
    for note in edits:
        unit, _, action = note.rpartition(" ")
        opposite = f"{unit} {'keep' if action == 'drop' else 'drop'}"
        if action in ("keep", "drop") and " head " in f" {unit} ":
            if opposite in kept:
                kept.pop(len(kept) - 1 - kept[::-1].index(opposite))
                continue
        elif action in ("keep", "drop") and kept and kept[-1] == opposite:
            kept.pop()
            continue
        kept.append(note)
    return kept


def plan_cost_of(plan: PrunePlan | None, base: BaseArch) -> dict[str, Any]:
    """Params and MACs of ``plan`` (dense if None) and their fractions of the base model."""
    dense = plan_cost(PrunePlan.dense(base))
    now = plan_cost(plan) if plan is not None else dense
    return {
        "params": now["params"],
        "macs": now["macs"],
        "params_fraction": now["params"] / dense["params"],
        "macs_fraction": now["macs"] / dense["macs"],
        "params_base": dense["params"],
        "macs_base": dense["macs"],
    }


def run_plan(
    loaded: LoadedModel,
    plan: PrunePlan,
    data: DataSpec | None,
    *,
    root: str | Path,
    model_spec: ModelSpec,
    bench_batch_sizes: tuple[int, ...] = (1, 64),
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> tuple[RunDir, dict[str, Any]]:
    """Prune a copy of ``loaded`` with ``plan`` as it is, measure before/after and export: a prune run."""
    spec = PruneSpec(
        model=model_spec, method=plan.method, data=data, plan=plan, bench_batch_sizes=bench_batch_sizes
    )
    run, result = start(spec, root=root, loaded=loaded, callbacks=callbacks, cancel=cancel)
    return run, result.to_dict()


def retrain_spec(export: str | Path, data: DataSpec, epochs: int, *, device: str = "cpu") -> RecoverySpec:
    """Recovery of a pruned export, distilled from the model it was pruned from when that is known."""
    teacher = infer_teacher(str(export))
    return RecoverySpec(
        model=ModelSpec(str(export), device=device),
        data=data,
        teacher=None if teacher is None else teacher.with_(device=device),
        overrides={"epochs": int(epochs), **({} if teacher is not None else {"kd": "none"})},
    )


def start_retrain(
    export: str | Path,
    data: DataSpec,
    epochs: int,
    *,
    device: str = "cpu",
    threads: int | None = None,
    owner: str | None = None,
) -> str:
    """Submit the retraining of a pruned export as a job next to its run; returns the job's run folder.

    ``threads``: the job's CPU threads (the page passes the studio's thread policy, :mod:`studio.threads`);
    ``owner``: the session's token, so only that session may cancel or resume the job.
    """
    out = Path(export).parent.parent / f"{Path(export).parent.name}-retrain"
    spec = retrain_spec(export, data, epochs, device=device)
    jobs.submit(spec, out, device=device, threads=threads, owner=owner)
    return str(out)
