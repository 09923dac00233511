"""The sensitivity flow: accuracy vs fraction of one block's heads (or MLP neurons) removed, block by block, as a
run -- the per-layer sensitivity analysis of Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017), as
Distiller popularised it (:mod:`studio.analysis.sensitivity`).

Each point is a full evaluation, so at real size (DeiT-S: 12 blocks x 3 fractions on a test split) the Sensitivity
page submits it as a job (``python -m studio run RUN``); on the demo it runs inline. Nothing is pruned for good:
``plan`` is null, ``before``/``after`` hold the model's counted cost, and the flow's section
(``results["sensitivity"]``) is :meth:`SensitivityResult.to_dict` (the dense reference and one row per
(block, fraction)) plus the images scored and evaluated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..analysis.criteria import batch_sizes, calibration_batches
from ..analysis.importance import CRITERIA
from ..analysis.sensitivity import DEFAULT_FRACTIONS, SCOPES, SensitivityResult, check_fractions, sensitivity
from ..data import DataSpec, prepare
from ..errors import StudioError
from ..events import Callback, CancelToken, emit
from ..models import LoadedModel, ModelSpec
from ..runs import RunDir
from . import FLOWS, Flow
from .stages import analysis_flow, section_of

SPLITS = ("train", "val", "test")
HEADS_ONLY = ("ablation",)  # criteria that score heads and nothing else (head ablation)


@dataclass(frozen=True)
class SensitivitySpec:
    """What the sweep measures (``spec.json`` of a sensitivity run).

    Attributes:
        scope: ``heads`` or ``mlp``: the units removed from one block at a time.
        criterion: a registered importance criterion ranking the units (``l1``: weight magnitude, no data).
        fractions: the fractions of a block's units removed, each in (0, 1).
        eval_split / limit: the split evaluated, and at most ``limit`` images of it (seeded; None: the data's own
            limit) -- each point is a full evaluation, so this bounds the sweep's time.
        batches / batch_size / calib_split: calibration for a criterion that needs data (``taylor``); unused by
            ``l1``/``l2``.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=lambda: DataSpec("demo"))
    scope: str = "heads"
    criterion: str = "l1"
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    eval_split: str = "test"
    limit: int | None = None
    batches: int = 4
    batch_size: int = 64
    calib_split: str = "train"
    micro_batch: int = 0
    seed: int = 0

    @property
    def kind(self) -> str:
        return "sensitivity"

    @property
    def needs_data(self) -> bool:
        """Whether the criterion scores from calibration batches."""
        return CRITERIA.get(self.criterion).needs_data

    @property
    def eval_data(self) -> DataSpec:
        """The data evaluated: ``data`` with ``limit`` applied (the smaller of the two limits)."""
        if self.limit is None or (self.data.limit is not None and self.data.limit <= self.limit):
            return self.data
        return dataclasses.replace(self.data, limit=self.limit)

    def validate(self) -> None:
        """Refuse what cannot be swept, with one sentence saying what to fix, before any model is loaded."""
        if self.scope not in SCOPES:
            raise StudioError(f"Unknown scope {self.scope!r}: the sweep removes {' or '.join(SCOPES)} units.")
        if self.criterion not in CRITERIA:
            raise StudioError(
                f"Unknown criterion {self.criterion!r}: use one of {', '.join(CRITERIA.names())}."
            )
        if self.scope != "heads" and self.criterion in HEADS_ONLY:
            raise StudioError(
                f"Criterion '{self.criterion}' scores heads only: sweep heads or pick l1, l2, taylor."
            )
        check_fractions(self.fractions)
        for name in ("eval_split", "calib_split"):
            if getattr(self, name) not in SPLITS:
                raise StudioError(f"{name} must be one of {', '.join(SPLITS)}, not {getattr(self, name)!r}.")
        for name, low in (("batches", 0), ("batch_size", 1), ("micro_batch", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise StudioError(f"--{name.replace('_', '-')} must be a whole number ≥ {low}, got {v!r}.")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise StudioError(
                f"The evaluation limit must be a whole number of images ≥ 1, got {self.limit!r}."
            )
        if self.needs_data and self.batches < 1:
            raise StudioError(
                f"Criterion '{self.criterion}' needs calibration data: give batches ≥ 1 (or use l1)."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "sensitivity",
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "scope": self.scope,
            "criterion": self.criterion,
            "fractions": list(self.fractions),
            "eval_split": self.eval_split,
            "limit": self.limit,
            "batches": self.batches,
            "batch_size": self.batch_size,
            "calib_split": self.calib_split,
            "micro_batch": self.micro_batch,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivitySpec:
        try:
            return cls(
                model=ModelSpec.from_dict(d.get("model") or {}),
                data=DataSpec.from_dict(d.get("data") or {"kind": "demo"}),
                scope=str(d.get("scope", "heads")),
                criterion=str(d.get("criterion", "l1")),
                fractions=tuple(float(f) for f in d.get("fractions", DEFAULT_FRACTIONS)),
                eval_split=str(d.get("eval_split", "test")),
                limit=None if d.get("limit") is None else int(d["limit"]),
                batches=int(d.get("batches", 4)),
                batch_size=int(d.get("batch_size", 64)),
                calib_split=str(d.get("calib_split", "train")),
                micro_batch=int(d.get("micro_batch", 0)),
                seed=int(d.get("seed", 0)),
            )
        except (TypeError, ValueError) as e:
            raise StudioError(f"The sensitivity spec is malformed ({e}).") from None

    def with_(self, **changes: Any) -> SensitivitySpec:
        return dataclasses.replace(self, **changes)


def _sweep(
    spec: SensitivitySpec, loaded: LoadedModel, callbacks: Sequence[Callback], cancel: CancelToken | None
) -> dict[str, Any]:
    """Score the units, evaluate the dense model and every single-block pruning: the run's section."""
    batches = []
    if spec.needs_data:
        emit(callbacks, "log", message=f"drawing {spec.batches} calibration batches of {spec.calib_split}")
        batches = calibration_batches(
            loaded, spec.data, spec.calib_split, spec.batches, spec.batch_size, spec.seed
        )
    eval_data = prepare(
        spec.eval_data,
        spec.eval_split,
        loaded.data_config,
        loaded.base.num_classes,
        class_names=loaded.known_class_names,
    )
    result: SensitivityResult = sensitivity(
        loaded,
        eval_data,
        scope=spec.scope,
        criterion=spec.criterion,
        fractions=spec.fractions,
        batches=batches,
        seed=spec.seed,
        micro_batch=spec.micro_batch,
        callbacks=callbacks,
        cancel=cancel,
    )
    return {**result.to_dict(), "calibration_images": sum(batch_sizes(batches))}


# the sweep keeps no checkpoints: a resumed run simply runs again
run_sensitivity = analysis_flow("sensitivity", _sweep)


def sensitivity_of(run: RunDir) -> SensitivityResult:
    """The sweep a finished sensitivity run recorded (refused, saying why, for any other run)."""
    return SensitivityResult.from_dict(section_of(run, "sensitivity"))


FLOWS.add(
    "sensitivity",
    Flow(
        "sensitivity",
        SensitivitySpec,
        run_sensitivity,
        "per-block sensitivity: accuracy vs fraction of one block's heads or MLP neurons removed (no pruning)",
    ),
)
