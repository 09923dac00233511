"""Fault tolerance of every kind of work that trains: cancel (the ``CANCEL`` file a job's Cancel button writes)
after the first checkpoint, resume, and the result equals an uninterrupted run (same metrics, same weights).

Parametrised over :data:`studio.flows.FLOWS`: a kind registered with ``trains=True`` is tested at once, and
fails here until it has a tiny example spec below. Kinds with several phases are also cancelled in a later one
(P3B's fine-tuning after the slice, SPLoRA's recovery after the adapter training).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from studio.data import DataSpec
from studio.errors import Cancelled
from studio.events import Event
from studio.flows import create_run, load_flows, run_folder
from studio.flows.prune import PruneSpec
from studio.flows.retrain import RecoverySpec
from studio.flows.sls import SLSRunSpec
from studio.models import ModelSpec
from studio.runs import RunDir

DATA = DataSpec("demo", limit=96)
DEMO = ModelSpec("demo", device="cpu")

# when to cancel: a predicate on the run folder, checked at every training step
Stage = Callable[[RunDir], bool]
FIRST: Stage = lambda rd: rd.has_checkpoint  # noqa: E731
LATER: dict[str, tuple[str, Stage]] = {
    "p3b": ("finetune", lambda rd: (rd.path / "p3b_finetune.pt").exists()),
    "splora": ("recovery", lambda rd: (rd.path / "splora-splora.pt").exists()),
}


def _spec(kind: str, tmp: Path) -> Any:
    """A tiny spec of each training kind (CPU, seconds) that trains over more than one checkpoint."""
    if kind == "p3b":  # 2 pruning epochs, then the slice and 2 fine-tuning epochs; 2 steps an epoch
        params = {"epochs": 4, "probe": "mean", "steps_per_update": 1, "prune_ratio": 0.5}
        return PruneSpec(DEMO, "p3b", params, DATA, batch_size=32, bench=False)
    if kind == "splora":  # 2 adapter epochs, then 2 pruning steps with a recovery epoch each
        params = {
            "epochs": 2,
            "recovery_epochs": 1,
            "prune_step": 0.25,
            "target_density": 0.5,
            "score_batches": 1,
            "rank": 2.0,
        }
        return PruneSpec(DEMO, "splora", params, DATA, batch_size=32, bench=False)
    if kind == "sls":
        return SLSRunSpec(model=DEMO, data=DATA, keep=4, retrain="cpu", epochs=2, bench=False)
    if kind == "retrain":
        src = tmp / "src"
        if not src.exists():
            run_folder(create_run(PruneSpec(DEMO, "magnitude", {"target_macs": 0.5}, DATA, bench=False), src))
        return RecoverySpec(
            ModelSpec(str(src / "export"), device="cpu"),
            DATA,
            DEMO,
            overrides={"epochs": 2, "batch_size": 32},
            bench=False,
        )
    raise AssertionError(f"flow '{kind}' trains but has no tiny spec here: add one so its resume is tested")


def _cases() -> list[Any]:
    kinds = [k for k in sorted(load_flows().names()) if load_flows().get(k).trains]
    cases = [pytest.param(k, "first", id=k) for k in kinds]
    cases += [pytest.param(k, LATER[k][0], id=f"{k}-{LATER[k][0]}") for k in kinds if k in LATER]
    return cases


class CancelWhen:
    """A callback writing the run's ``CANCEL`` file (as the page's Cancel does) at the first training step
    after ``stage`` holds: the training loop then saves a checkpoint and stops mid-epoch."""

    def __init__(self, run: RunDir, stage: Stage) -> None:
        self.run, self.stage, self.fired = run, stage, False
        self.seen: list[str] = []  # the checkpoints there were when it cancelled

    def __call__(self, event: Event) -> None:
        if self.fired or event.kind != "progress" or event.data.get("task") != "train":
            return
        if self.stage(self.run):
            self.seen = [p.name for p in self.run.checkpoints()]
            self.run.cancel_file.write_text("cancel\n")
            self.fired = True


def _weights(run: RunDir) -> dict[str, torch.Tensor]:
    return load_file(str(run.export_dir / "model.safetensors"))


def _figures(res: dict[str, Any]) -> dict[str, Any]:
    keep = ("params", "macs", "top1", "loss", "n")
    return {"plan": res["plan"], "after": {k: res["after"].get(k) for k in keep}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_loaded) -> Callable[[str], tuple[Any, RunDir]]:
    """``kind -> (spec, its uninterrupted run)``, each run once per module (the cases of a kind share it)."""
    done: dict[str, tuple[Any, RunDir]] = {}

    def get(kind: str) -> tuple[Any, RunDir]:
        if kind not in done:
            tmp = tmp_path_factory.mktemp(f"full-{kind}")
            spec = _spec(kind, tmp)
            full = create_run(spec, tmp / "full")
            run_folder(full, loaded=_loaded(kind, demo_loaded))
            done[kind] = spec, full
        return done[kind]

    return get


def _loaded(kind: str, demo_loaded: Any) -> Any:
    return None if kind == "retrain" else demo_loaded  # retrain loads its own (pruned) model


@pytest.mark.parametrize(("kind", "stage"), _cases())
def test_cancel_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(
    kind, stage, tmp_path, demo_loaded, uninterrupted
):
    spec, full = uninterrupted(kind)
    loaded = _loaded(kind, demo_loaded)
    part = create_run(spec, tmp_path / "part")
    when = FIRST if stage == "first" else LATER[kind][1]
    cancel = CancelWhen(part, when)
    with pytest.raises(Cancelled):
        run_folder(part, loaded=loaded, callbacks=[cancel])
    assert cancel.fired, f"{kind} never reached the {stage} checkpoint"
    if (
        kind == "splora" and stage == "first"
    ):  # the adapter training itself is checkpointed, not only its end:
        # the default ViT protocol's head-only first half is the first checkpoint
        assert cancel.seen == ["splora-splora.step0.head.pt"], cancel.seen
    status = part.status()
    assert status["state"] == "cancelled" and status["resumable"] is True, status
    assert part.has_checkpoint and not part.results_file.exists()
    assert part.cancel_file.exists()  # the stop request stays until a resume clears it

    run_folder(part, loaded=loaded, resume=True)  # attempt 2 must not cancel itself on the old CANCEL file
    assert part.status()["state"] == "done" and not part.cancel_file.exists()
    assert _figures(part.results()) == _figures(full.results())
    wa, wb = _weights(full), _weights(part)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{kind}: {k} differs after resume"
