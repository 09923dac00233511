"""What every criterion shares: the one form of unit scores, calibration batches and gradients, and the
torch-pruning importance objects Isomorphic's pruner (Fang et al., ECCV 2024) ranks with.

The groups a criterion sums over are written out once, in :mod:`studio.analysis.groups`. Gradients for the Taylor
criteria are accumulated once (:func:`accumulate_gradients`) and attached to a copy (:func:`with_grads`): the
cached model is never touched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .. import memory
from ..data import DataSpec, make_loader, prepare
from ..errors import StudioError
from ..evaluate import logits_of
from ..events import Callback, CancelToken, check, progress
from ..models import LoadedModel
from ..plan import BaseArch

Batch = tuple[torch.Tensor, torch.Tensor]
Matrix = tuple[tuple[float, ...], ...]
Grads = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class UnitScores:
    """One criterion's scores of every unit of the base model (higher = keep); ``None`` for unit kinds it does
    not score. The one form of unit scores: the Importance analysis shows them, the methods select from them.

    Attributes:
        heads: per block, one score per head.
        head_dims: per block, one score per within-head dim (shared by q, k, v of all heads of the block).
        mlp: per block, one score per MLP hidden neuron.
        embed: one score per embedding (residual) channel.
    """

    criterion: str = ""
    heads: Matrix | None = None
    head_dims: Matrix | None = None
    mlp: Matrix | None = None
    embed: tuple[float, ...] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        def mat(m: Matrix | None) -> list[list[float]] | None:
            return None if m is None else [list(r) for r in m]

        return {
            "criterion": self.criterion,
            "heads": mat(self.heads),
            "head_dims": mat(self.head_dims),
            "mlp": mat(self.mlp),
            "embed": None if self.embed is None else list(self.embed),
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnitScores:
        def mat(m: Any) -> Matrix | None:
            return None if m is None else tuple(tuple(float(v) for v in r) for r in m)

        return cls(
            criterion=str(d["criterion"]),
            heads=mat(d.get("heads")),
            head_dims=mat(d.get("head_dims")),
            mlp=mat(d.get("mlp")),
            embed=None if d.get("embed") is None else tuple(float(v) for v in d["embed"]),
            seconds=float(d.get("seconds", 0.0)),
        )

    @classmethod
    def of_tensors(
        cls,
        criterion: str = "",
        *,
        heads: Sequence[torch.Tensor] | None = None,
        head_dims: Sequence[torch.Tensor] | None = None,
        mlp: Sequence[torch.Tensor] | None = None,
        embed: torch.Tensor | None = None,
        seconds: float = 0.0,
    ) -> UnitScores:
        """From per-block score tensors (what criteria compute)."""

        def rows(ts: Sequence[torch.Tensor] | None) -> Matrix | None:
            return None if ts is None else tuple(tuple(float(v) for v in t.flatten().tolist()) for t in ts)

        flat = None if embed is None else tuple(float(v) for v in embed.flatten().tolist())
        return cls(criterion, rows(heads), rows(head_dims), rows(mlp), flat, seconds)

    def tensors(self, scope: str) -> tuple[torch.Tensor, ...] | torch.Tensor | None:
        """A scope's scores as float64 tensors: one per block (``heads``, ``head_dims``, ``mlp``) or one
        (``embed``); None if not scored."""
        v = getattr(self, scope)
        if v is None:
            return None
        if scope == "embed":
            return torch.tensor(v, dtype=torch.float64)
        return tuple(torch.tensor(r, dtype=torch.float64) for r in v)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> UnitScores:
        """Apply ``fn`` to every score tensor (e.g. ``torch.sqrt`` to turn sums of squares into L2 norms)."""

        def per(scope: str) -> list[torch.Tensor] | None:
            ts = self.tensors(scope)
            return None if ts is None else [fn(t) for t in ts]  # type: ignore[union-attr]

        embed = self.tensors("embed")
        return UnitScores.of_tensors(
            self.criterion,
            heads=per("heads"),
            head_dims=per("head_dims"),
            mlp=per("mlp"),
            embed=None if embed is None else fn(embed),  # type: ignore[arg-type]
            seconds=self.seconds,
        )


# the selection rule every method and analysis shares: keep the top-scored units, at least one
def keep_count(n: int, ratio: float, round_to: int = 1) -> int:
    """Units kept of ``n`` when removing ``ratio`` of them: at least 1, rounded up to ``round_to`` (≤ n)."""
    k = max(1, n - math.floor(ratio * n + 1e-9))
    if round_to > 1:
        k = min(n, math.ceil(k / round_to) * round_to)
    return k


def top_k(scores: torch.Tensor, k: int) -> tuple[int, ...] | None:
    """Indices of the ``k`` highest scores (ties: lower index first), sorted; ``None`` if all are kept."""
    if k >= len(scores):
        return None
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return tuple(sorted(int(i) for i in order))


def make_importance(name: str) -> tp.importance.Importance:
    """torch-pruning's grouped importance by name (the reference's ``--pruning-type`` choices); which criterion
    uses which is declared in the one criteria registry (``Criterion.torch_pruning``)."""
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=int(name[1]))
    if name == "random":
        return tp.importance.RandomImportance()
    raise StudioError(f"Unknown torch-pruning importance '{name}': use taylor, l1, l2 or random.")


def classifiers(model: nn.Module) -> list[nn.Module]:
    """The classifier layers, by identity (``head`` and the distilled DeiT's ``head_dist``)."""
    return [
        h
        for h in (getattr(model, "head", None), getattr(model, "head_dist", None))
        if isinstance(h, nn.Linear)
    ]


def example_inputs(model: nn.Module) -> torch.Tensor:
    pe = model.patch_embed
    device = next(model.parameters()).device
    return torch.zeros(1, pe.proj.in_channels, *pe.img_size, device=device)


def micro_batches(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """Chunks of at most ``size`` images of one batch, each with its share of the batch (weights sum to 1).

    A batch's mean loss is the share-weighted sum of its chunks' mean losses, so gradients accumulated over
    the chunks are the batch's gradients while only one chunk's activations are alive at a time.
    """
    n = len(x)
    size = max(1, min(size, n)) if size > 0 else n
    for s in range(0, n, size):
        yield x[s : s + size], y[s : s + size], min(size, n - s) / n


def batch_sizes(batches: Sequence[Batch]) -> list[int]:
    """The number of images in each of ``batches``, without a pass over drawn batches: sizing a micro-batch or
    counting the images must not decode the calibration images once more."""
    if isinstance(batches, CalibrationBatches):
        return batches.sizes()
    return [len(y) for _, y in batches]


def largest_batch(batches: Sequence[Batch]) -> int:
    """The most images in one of ``batches`` (at least 1)."""
    return max(batch_sizes(batches), default=1)


def calibration_micro_batch(
    model: nn.Module, base: BaseArch, batches: Sequence[Batch], mode: str, asked: int
) -> int:
    """The micro-batch a calibration pass uses: ``asked`` (> 0) or the largest within the activation budget."""
    biggest = largest_batch(batches)
    device = next(model.parameters()).device
    explicit = mode == "hessian" or not any(getattr(m, "fused_attn", False) for m in model.modules())
    return memory.micro_batch(base, biggest, mode, device, asked=asked, explicit=explicit)


def accumulate_gradients(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    micro_batch: int = 0,
    base: BaseArch | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> dict[str, torch.Tensor]:
    """∂L/∂w summed over ``batches`` (eval mode, mean cross-entropy per batch, never zeroed: the reference).

    Each batch runs in micro-batches (``micro_batch`` images, or chosen within the activation budget when 0
    and ``base`` is given) whose gradients accumulate to the batch's, so the peak memory is one micro-batch's
    activations however large the calibration batch is.
    """
    m = copy.deepcopy(model).eval()
    device = next(m.parameters()).device
    for p in m.parameters():
        p.requires_grad_(True)
        p.grad = None
    if micro_batch <= 0 and base is not None:
        micro_batch = calibration_micro_batch(m, base, batches, "backward", 0)
    for i, (x, y) in enumerate(batches):
        check(cancel)
        total = 0.0
        yb = torch.as_tensor(y)
        for xc, yc, share in micro_batches(x, yb, micro_batch):
            with torch.enable_grad():
                loss = F.cross_entropy(logits_of(m, xc.to(device)), yc.to(device).long()) * share
                loss.backward()
            total += float(loss.detach())
        progress(callbacks, "taylor gradients", i + 1, len(batches), loss=total)
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def with_grads(model: nn.Module, grads: Grads | None) -> nn.Module:
    """A deep copy of ``model`` whose parameters carry ``grads`` (``deepcopy`` does not copy ``.grad``)."""
    m = copy.deepcopy(model).eval()
    for n, p in m.named_parameters():
        p.requires_grad_(True)
        g = None if grads is None else grads.get(n)
        p.grad = None if g is None else g.detach().clone().to(p.device)
    return m


class CalibrationBatches(Sequence[Batch]):
    """``n`` shuffled (seeded) batches of a split, drawn afresh on each pass instead of held in memory.

    Every pass yields the same batches in the same order (the loader's generator is re-seeded), so methods
    that pass over the calibration data several times see the same images, and the memory a calibration
    holds does not grow with the number of batches.
    """

    def __init__(self, dataset: Any, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.dataset, self.batch_size, self.seed, self.device = dataset, batch_size, seed, device
        self._len = min(n, -(-len(dataset) // batch_size))

    def __len__(self) -> int:
        return self._len

    def sizes(self) -> list[int]:
        """Images per batch (the last one may be short), known without drawing them."""
        return [min(self.batch_size, len(self.dataset) - i * self.batch_size) for i in range(self._len)]

    def __iter__(self) -> Iterator[Batch]:
        if self._len == 0:
            return
        loader = make_loader(self.dataset, batch_size=self.batch_size, shuffle=True, seed=self.seed)
        for i, (x, y) in enumerate(loader):
            yield x.to(self.device), torch.as_tensor(y).to(self.device)
            if i + 1 == self._len:  # stop before the loader decodes a batch nobody asked for
                return

    def __getitem__(self, i: int) -> Batch:  # type: ignore[override]
        if not -self._len <= i < self._len:
            raise IndexError(i)
        for j, b in enumerate(self):
            if j == i % self._len:
                return b
        raise IndexError(i)


def calibration_batches(
    loaded: LoadedModel, data: DataSpec, split: str, n: int, batch_size: int, seed: int = 0
) -> CalibrationBatches:
    """``n`` shuffled (seeded) batches of a split, on the model's device (see :class:`CalibrationBatches`)."""
    # the split is read lazily: a calibration decodes only the images it draws, not the whole split
    ds = prepare(
        data,
        split,
        loaded.data_config,
        loaded.base.num_classes,
        class_names=loaded.known_class_names,
        keep_in_memory=False,
    )
    return CalibrationBatches(ds, n, batch_size, seed, loaded.device)
