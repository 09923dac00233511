"""Short runs the studio does inline (seconds on the demo), recorded in run folders exactly like CLI runs.

A prune from the Prune page and an export of the active plan from the Export page each get their own
``runs/<time>-<kind>-<suffix>/`` with ``spec.json``, ``status.json``, ``events.jsonl``, ``plan.json``,
``results.json`` and ``export/``, so the Runs, Compare and Export pages and the CLI all see them. Long work
(retraining) goes through background jobs instead (:mod:`studio.jobs`).
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .events import Callback, CancelToken
from .models import LoadedModel
from .plan import PrunePlan
from .runs import RunDir, new_run_id


def new_run(root: str | Path, prefix: str, spec: dict[str, Any]) -> RunDir:
    """A fresh run folder under ``root``; the random suffix keeps two sessions in the same second apart."""
    path = Path(root) / f"{new_run_id(prefix)}-{secrets.token_hex(2)}"
    return RunDir.create(path, spec)


def prune_run(
    spec: Any,
    *,
    root: str | Path,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> tuple[RunDir, Any]:
    """:func:`studio.prune.pipeline.run_prune` in a new run folder, with its status recorded.

    Args:
        spec: a :class:`~studio.prune.pipeline.PruneSpec`.
        loaded: the (cached, never mutated) model to prune a copy of.
    Returns:
        The run folder and the :class:`~studio.prune.pipeline.PruneResult`.
    """
    from .prune.pipeline import run_prune

    run = new_run(root, f"prune-{spec.method}", spec.to_dict())
    with run.tracking():
        result = run_prune(spec, run=run, loaded=loaded, callbacks=callbacks, cancel=cancel)
    return run, result


def export_plan_run(
    loaded: LoadedModel,
    plan: PrunePlan | None,
    *,
    root: str | Path,
    model_spec: dict[str, Any],
    callbacks: Sequence[Callback] = (),
) -> RunDir:
    """Apply ``plan`` (None: export as is) to a copy of ``loaded`` and export it to a new run folder."""
    from .bench import profile
    from .costs import with_summary
    from .export import export_loaded
    from .surgery import apply_plan

    spec = {"kind": "export", "model": model_spec, "plan": None if plan is None else plan.to_dict()}
    run = new_run(root, f"export-{plan.method if plan else 'dense'}", spec)
    with run.tracking():
        model = loaded.model
        if plan is not None:
            plan = with_summary(plan)
            model = apply_plan(copy.deepcopy(loaded.model), plan).eval()
            plan.save(run.plan_file)
        prof = profile(model, loaded.data_config["input_size"])
        export_loaded(model, loaded, run.export_dir, plan=plan, metrics=prof)
        run.write_results(
            {"method": plan.method if plan else "dense", "after": prof, "export": str(run.export_dir)}
        )
    return run


def export_onnx_for(folder: str | Path, loaded: LoadedModel) -> dict[str, Any]:
    """Write ``model.onnx`` next to an export (``folder``) and its parity check to ``onnx.json``.

    ``loaded`` is the export loaded back (the model that is traced); the parity is the largest absolute logit
    difference between onnxruntime and PyTorch on random inputs (:func:`studio.export.export_onnx`).
    """
    from .export import export_onnx
    from .runs import write_json

    folder = Path(folder)
    result = export_onnx(loaded.model, folder / "model.onnx", loaded.data_config["input_size"])
    write_json(folder / "onnx.json", result)
    return result


def load_plan_text(text: str | bytes, base: Any) -> PrunePlan:
    """A plan uploaded as JSON, validated, and checked to be made for ``base`` (the current model's).

    Raises :class:`~studio.errors.StudioError` naming the bad field, or saying which model the plan is for.
    """
    from .costs import with_summary
    from .errors import StudioError

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
