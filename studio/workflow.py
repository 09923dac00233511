"""Short runs the studio does inline (seconds on the demo), through the same specs and flows as every job.

A prune from the Prune page and an export of the active plan from the Export page are prune runs
(:class:`~studio.flows.prune.PruneSpec`, the latter with the plan given and no measurement), each in its own
``runs/<time>-<kind>-<suffix>/`` so the Runs, Compare and Export pages and the CLI all see them. Long work
goes through background jobs instead (:func:`studio.jobs.submit`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .costs import with_summary
from .errors import StudioError
from .events import Callback, CancelToken
from .export import export_onnx
from .flows import create_run, run_folder, start
from .flows.prune import PruneSpec
from .flows.stages import RunResult
from .models import LoadedModel, ModelSpec
from .plan import BaseArch, PrunePlan
from .runs import RunDir, new_run_id, write_json


def prune_run(
    spec: PruneSpec,
    *,
    root: str | Path,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> tuple[RunDir, RunResult]:
    """Run a prune spec inline in a new run folder under ``root`` (``loaded``: the cached model, never mutated)."""
    return start(spec, root=root, loaded=loaded, callbacks=callbacks, cancel=cancel)


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
    run = create_run(spec, Path(root) / f"{new_run_id(f'export-{plan.method}')}-{secrets.token_hex(2)}")
    run_folder(run, loaded=loaded, callbacks=callbacks, spec=spec)
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
    plan = PrunePlan.from_json(text)
    if plan.base.to_dict() != base.to_dict():
        raise StudioError(
            f"This plan was made for {plan.base.arch} ({plan.base.depth} blocks, width {plan.base.embed_dim}, "
            f"{plan.base.num_classes} classes), not for the current model ({base.arch}, {base.depth} blocks, "
            f"width {base.embed_dim}, {base.num_classes} classes). Load the model it was made for first."
        )
    return with_summary(plan)
