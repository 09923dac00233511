"""Plans and exports the pages hand around: an export of a given plan, ONNX next to an export, an uploaded plan.

An export of the active plan is a prune run (:class:`~studio.flows.prune.PruneSpec` with the plan given and no
measurement) in its own ``runs/<time>-export-<method>-<suffix>/``, so the Runs, Compare and Export pages and
the CLI see it like any run. Pruning itself is :func:`studio.flows.start` (inline) or
:func:`studio.jobs.submit` (a job).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .costs import with_summary
from .errors import StudioError
from .events import Callback
from .export import export_onnx
from .flows import start
from .flows.prune import PruneSpec
from .models import LoadedModel, ModelSpec
from .plan import BaseArch, PrunePlan
from .runs import RunDir, write_json


def export_plan_run(
    loaded: LoadedModel,
    plan: PrunePlan | None,
    *,
    root: str | Path,
    model_spec: ModelSpec,
    callbacks: Sequence[Callback] = (),
) -> RunDir:
    """Apply ``plan`` (None: the dense plan) to a copy of ``loaded`` and export it to a new run folder."""
    plan = with_summary(plan if plan is not None else PrunePlan.dense(loaded.base))
    spec = PruneSpec(model=model_spec, method=plan.method, plan=plan, evaluate=False, bench=False)
    run, _ = start(spec, root=root, loaded=loaded, callbacks=callbacks, label=f"export-{plan.method}")
    return run


def export_onnx_for(folder: str | Path, loaded: LoadedModel) -> dict[str, Any]:
    """Write ``model.onnx`` next to an export (``folder``) and its parity check to ``onnx.json``.

    ``loaded`` is the export loaded back (the model that is traced); the parity is the largest absolute logit
    difference between onnxruntime and PyTorch on random inputs (:func:`studio.export.export_onnx`).
    """
    folder = Path(folder)
    result = export_onnx(loaded.model, folder / "model.onnx", loaded.data_config["input_size"])
    write_json(folder / "onnx.json", result)
    return result


def load_plan_text(text: str | bytes, base: BaseArch) -> PrunePlan:
    """A plan uploaded as JSON, validated, and checked to be made for ``base`` (the current model's).

    Raises :class:`~studio.errors.StudioError` naming the bad field, or saying which model the plan is for.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise StudioError("The plan file is not UTF-8 text: upload the plan.json a run wrote.") from None
    return with_summary(PrunePlan.from_json(text).made_for(base))
