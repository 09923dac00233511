"""Top-1 and per-class accuracy of a model on a labelled split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .data import make_loader
from .events import Callback, CancelToken, check, progress


@dataclass(frozen=True)
class EvalResult:
    """Accuracy (fractions in [0, 1]) and mean cross-entropy over ``n`` samples."""

    top1: float
    loss: float
    n: int
    per_class: list[float]
    confusion: list[list[int]]

    def to_dict(self) -> dict:
        return asdict(self)


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class logits; distilled DeiT returns (cls, dist) in train mode, the average in eval mode."""
    out = model(x)
    if isinstance(out, tuple | list):
        out = (out[0] + out[1]) / 2
    return out


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    data: Dataset,
    *,
    batch_size: int = 256,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a split (on CPU)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs, labels = [], []
    loader = make_loader(data, batch_size=batch_size, shuffle=False)
    for i, (x, y) in enumerate(loader):
        check(cancel)
        outs.append(logits_of(model, x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
        progress(callbacks, "evaluate", i + 1, len(loader))
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


def evaluate(
    model: torch.nn.Module,
    data: Dataset,
    *,
    batch_size: int = 256,
    num_classes: int | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> EvalResult:
    logits, y = predict(model, data, batch_size=batch_size, callbacks=callbacks, cancel=cancel)
    return metrics_from_logits(logits, y, num_classes or logits.shape[1])


def metrics_from_logits(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> EvalResult:
    pred = logits.argmax(1)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    conf.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    support = conf.sum(1).clamp(min=1)
    return EvalResult(
        top1=float((pred == y).float().mean()),
        loss=float(F.cross_entropy(logits, y)),
        n=len(y),
        per_class=[float(v) for v in conf.diag() / support],
        confusion=conf.tolist(),
    )
