"""The one training loop: demo build, retraining, P3B, SPLoRA and distributed recovery all use it.

AdamW with linear warm-up and cosine decay (per step), bf16 autocast on CUDA, a choice of trainable parameters,
model selection on the validation split, checkpoint + exact resume (the data order, and a training augmentation
(:class:`studio.data.Augmented`), are pure functions of seed and epoch, and RNG state is saved, so a resumed run
equals an uninterrupted one on CPU), a cancel token checked every step, and two kinds of attachments:

- ``callbacks`` observe (progress and metric events for the CLI, the UI and ``events.jsonl``);
- ``hooks`` participate: objects with any of ``loss(model, x, y, state)``, ``after_backward(state)``,
  ``after_step(state)``, ``on_epoch_end(state)``, ``param_groups()``, ``state_dict()``/``load_state_dict()``
  (P3B's gates and probes, SPLoRA's masks, distillation).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import check_auto_augment
from .errors import Cancelled, StudioError
from .evaluate import evaluate, logits_of
from .events import Callback, CancelToken, emit, progress
from .runs import atomic_path

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle")
SGD_MOMENTUM = 0.9
ONECYCLE = {
    "pct_start": 0.3,
    "div_factor": 25.0,
    "final_div_factor": 1e4,
}  # torch.optim.lr_scheduler.OneCycleLR


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings. ``trainable`` is ``all``, ``head``, or ``re:<regex>`` over parameter names."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    label_smoothing: float = 0.0
    trainable: str = "all"
    seed: int = 0
    amp: bool = True
    grad_clip: float | None = None
    select: str = "val"  # "val": keep the best validation epoch; "last": keep the final weights
    early_stop: int | None = None  # stop after this many epochs without validation improvement
    num_workers: int = 0
    # timm's training parts (as the DeiT recipe the papers fine-tune with): Mixup/CutMix with soft targets
    # (timm.data.Mixup + SoftTargetCrossEntropy; alphas 0 = off) and a weight EMA (timm.utils.ModelEmaV3)
    mixup: float = 0.0  # Beta(α, α) of Mixup (DeiT: 0.8)
    cutmix: float = 0.0  # Beta(α, α) of CutMix (DeiT: 1.0)
    mix_prob: float = 1.0  # probability a batch is mixed at all
    ema_decay: float | None = None  # None: no EMA; else the EMA weights are validated, selected and kept
    accum_steps: int = 1  # micro-batches of batch_size per optimizer step (the papers' grad accumulation)
    # "adamw", or "sgd" (momentum 0.9: SPLoRA's reference ViT run); weight_decay applies to either
    optimizer: str = "adamw"
    # "cosine": linear warm-up then cosine to min_lr; "onecycle": torch's OneCycleLR shape (30 % cosine rise from
    # lr/25, then cosine to lr/25/1e4), the schedule of SPLoRA's reference ViT run
    schedule: str = "cosine"
    # timm's training transform for the training split (studio.data.make_transform, applied where the flow loads
    # it): random resized crop + flip, a RandAugment/AutoAugment policy string (DeiT: rand-m9-mstd0.5-inc1) and
    # random erasing in timm's pixel mode (DeiT: 0.25). auto_augment or re_prob imply augment; off, the training
    # split is the eval transform's images, kept in memory
    augment: bool = False
    auto_augment: str | None = None
    re_prob: float = 0.0
    # activation checkpointing (timm's set_grad_checkpointing): each block's activations are recomputed in the
    # backward pass instead of held, trading about a third more compute for a peak that no longer grows with
    # depth x batch (bench/checkpointing.py measures it)
    grad_checkpointing: bool = False

    def validate(self) -> TrainSpec:
        """Refuse settings the loop cannot honour, in one sentence each."""
        if self.optimizer not in OPTIMIZERS:
            raise StudioError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise StudioError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if not isinstance(self.augment, bool):
            raise StudioError(f"augment must be true or false, got {self.augment!r}.")
        if (
            isinstance(self.re_prob, bool)
            or not isinstance(self.re_prob, int | float)
            or not 0.0 <= self.re_prob <= 1.0  # NaN fails too
        ):
            raise StudioError(
                f"The random erasing probability re_prob must be a number in [0, 1] (DeiT: 0.25), got "
                f"{self.re_prob!r}."
            )
        check_auto_augment(self.auto_augment)
        if self.mixup < 0 or self.cutmix < 0 or not 0.0 <= self.mix_prob <= 1.0:
            raise StudioError("Mixup and CutMix alphas must be ≥ 0 and the mix probability in [0, 1].")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise StudioError(f"The EMA decay must be in [0, 1), got {self.ema_decay}.")
        if (
            isinstance(self.accum_steps, bool)
            or not isinstance(self.accum_steps, int)
            or self.accum_steps < 1
        ):
            raise StudioError(
                f"Gradient accumulation steps must be a whole number ≥ 1, got {self.accum_steps!r}."
            )
        return self

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    @property
    def augments(self) -> bool:
        """Whether the training split takes timm's training transform (see the fields above)."""
        return bool(self.augment or check_auto_augment(self.auto_augment) or self.re_prob > 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSpec:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class TrainState:
    """What hooks see: the live model, optimizer, position, the current batch and its loss."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    spec: TrainSpec
    epoch: int = 0
    step: int = 0  # global optimizer steps done
    steps_per_epoch: int = 0
    total_steps: int = 0
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class TrainResult:
    epochs_run: int
    steps: int
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_val_top1: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded by rank, optionally skipping batches already done (resume)."""

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        skip: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
        per_rank = math.ceil(n / world)
        order = (order + order[: per_rank * world - n])[rank::world]  # pad like DistributedSampler
        self.indices = order[skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def select_trainable(model: torch.nn.Module, rule: str) -> list[str]:
    """Set ``requires_grad`` by rule and return the trainable parameter names."""
    if rule == "all":
        pattern = None
    elif rule == "head":
        pattern = re.compile(r"^(head|head_dist|fc_norm)\.")
    elif rule.startswith("re:"):
        try:
            pattern = re.compile(rule[3:])
        except re.error as e:
            raise StudioError(f"Trainable pattern {rule!r} is not a valid regex ({e}).") from None
    else:
        raise StudioError(f"Unknown trainable rule {rule!r}: use all, head or re:<regex>.")
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(pattern is None or bool(pattern.search(name)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise StudioError(f"Trainable rule {rule!r} selects no parameter of the model.")
    return names


#: parameter names (endings) that take no weight decay, besides every vector
NO_DECAY = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # position tables are not decayed, as timm's no_weight_decay says (BEiT's relative position bias too)
        (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, spec: TrainSpec, steps_per_epoch: int) -> float:
    """Linear warm-up then cosine decay to ``min_lr``, per optimizer step; or OneCycleLR's shape (``onecycle``)."""
    total = max(1, spec.epochs * steps_per_epoch)
    if spec.schedule == "onecycle":
        start = spec.lr / ONECYCLE["div_factor"]
        end = start / ONECYCLE["final_div_factor"]
        up = max(1.0, ONECYCLE["pct_start"] * total - 1)  # torch counts the peak at step pct_start·total - 1
        if step <= up:
            return start + (spec.lr - start) * 0.5 * (1 - math.cos(math.pi * step / up))
        t = min(1.0, (step - up) / max(1.0, total - 1 - up))
        return end + (spec.lr - end) * 0.5 * (1 + math.cos(math.pi * t))
    warm = min(total - 1, int(spec.warmup_epochs * steps_per_epoch))
    if step < warm:
        return spec.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return spec.min_lr + (spec.lr - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _call(hooks: Sequence[Any], name: str, *args: Any) -> list[Any]:
    return [getattr(h, name)(*args) for h in hooks if hasattr(h, name)]


def fit(
    model: torch.nn.Module,
    train_data: Dataset,
    val_data: Dataset | None,
    spec: TrainSpec,
    *,
    hooks: Sequence[Any] = (),
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    ddp_model: torch.nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` in place and return its history; on cancel, save ``checkpoint`` and raise Cancelled.

    Args:
        ddp_model: the DistributedDataParallel wrapper to run forward/backward through (multi-process runs);
            ``model`` is then the wrapped module, used for evaluation and checkpoints.
    """
    device = next(model.parameters()).device
    spec.validate()
    if spec.augments and not hasattr(train_data, "set_epoch"):  # never a silent no-op
        raise StudioError(
            "This training asks for augmentation (augment, auto_augment or re_prob) but its training images are "
            "fixed tensors: load the split with studio.data.prepare(..., train_transform=True, auto_augment=..., "
            "re_prob=...), or turn augmentation off."
        )
    torch.manual_seed(spec.seed)
    select_trainable(model, spec.trainable)
    if spec.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise StudioError(
                "Activation checkpointing needs a timm model (set_grad_checkpointing); turn it off."
            )
        # forward hooks on the model (P3B's gates and probes, SPLoRA's statistics) would run twice per step
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            raise StudioError(
                "Activation checkpointing is for plain fine-tuning (the Retrain page, retrain): this training "
                "runs hooks that would see every forward pass twice. Turn it off."
            )
        model.set_grad_checkpointing(True)
    mixer = _mixer(model, spec, hooks)
    soft_ce = SoftTargetCrossEntropy()
    ema = None if spec.ema_decay is None else ModelEmaV3(model, decay=spec.ema_decay)
    judged = model if ema is None else ema.module  # the weights validated, selected and returned
    groups = _param_groups(model, spec.weight_decay)
    for extra in _call(hooks, "param_groups"):
        groups += extra
    params = [g for g in groups if g["params"]]
    optimizer = (
        torch.optim.SGD(params, lr=spec.lr, momentum=SGD_MOMENTUM)
        if spec.optimizer == "sgd"
        else torch.optim.AdamW(params, lr=spec.lr)
    )
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
        g["lr_scale"] = g["base_lr"] / spec.lr
    n = len(train_data)  # type: ignore[arg-type]
    accum = spec.accum_steps
    # a hook acting on every step must say it reads the step's accumulated gradients (P3B does: its gates
    # and probes act once per optimizer step)
    if accum > 1 and any(
        (hasattr(h, "after_backward") or hasattr(h, "after_step")) and not getattr(h, "accumulates", False)
        for h in hooks
    ):
        raise StudioError(
            "Gradient accumulation cannot run with a method that acts on every micro-batch (SPLoRA's masks): "
            "set accum_steps to 1."
        )
    batches_per_epoch = max(1, math.ceil(math.ceil(n / world) / spec.batch_size))
    steps_per_epoch = math.ceil(batches_per_epoch / accum)  # optimizer steps; the last group may be smaller
    state = TrainState(
        model, optimizer, spec, steps_per_epoch=steps_per_epoch, total_steps=spec.epochs * steps_per_epoch
    )
    best: dict[str, Any] = {"epoch": None, "top1": None, "weights": None}
    start_epoch, skip = 0, 0
    # partial-epoch sums and patience, saved with a mid-epoch checkpoint so a resumed history is exact
    acc: dict[str, Any] = {"loss_sum": 0.0, "correct": 0, "seen": 0, "since_best": 0}
    ckpt_path = Path(checkpoint) if checkpoint else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        start_epoch, skip = _load_checkpoint(ckpt_path, state, hooks, best, acc, ema)
        if rank != 0:  # the saved partial sums are the whole group's (see the cancel path)
            acc.update(loss_sum=0.0, correct=0, seen=0)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if spec.amp and device.type == "cuda"
        else contextlib.nullcontext()
    )
    net = ddp_model or model
    t0 = time.time()
    since_best = int(acc["since_best"])
    emit(
        callbacks, "status", state="training", epochs=spec.epochs, steps=state.total_steps, device=str(device)
    )
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, spec.epochs):
            state.epoch = epoch
            if hasattr(train_data, "set_epoch"):  # studio.data.Augmented: this epoch's crops, from the seed
                train_data.set_epoch(epoch, seed=spec.seed)
            sampler = EpochSampler(
                n, seed=spec.seed, epoch=epoch, skip=skip * accum * spec.batch_size, rank=rank, world=world
            )
            # an own generator: iterating a DataLoader would otherwise draw from the global RNG, which a
            # resumed run (new loader mid-epoch) would draw once more than an uninterrupted one
            loader = DataLoader(
                train_data,
                batch_size=spec.batch_size,
                sampler=sampler,
                num_workers=spec.num_workers,
                generator=torch.Generator().manual_seed(spec.seed),
            )
            net.train()
            loss_sum, correct, seen = float(acc["loss_sum"]), int(acc["correct"]), int(acc["seen"])
            for i, (x, y) in enumerate(loader, start=skip * accum):  # i: micro-batch of the epoch
                pos = i % accum
                group = min(accum, batches_per_epoch - (i - pos))  # micro-batches of this optimizer step
                if pos == 0:  # cancel only between optimizer steps: a checkpoint never holds half a gradient
                    if cancel is not None and cancel.is_set:
                        raise Cancelled(f"cancelled at epoch {epoch} step {state.step}")
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(state.step, spec, steps_per_epoch) * g["lr_scale"]
                    optimizer.zero_grad(set_to_none=True)
                x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
                state.batch = (x, y)
                with autocast:
                    custom = [v for v in _call(hooks, "loss", net, x, y, state) if v is not None]
                    if custom:
                        loss = custom[0]
                    elif mixer is not None and len(y) % 2 == 0:  # timm mixes pairs: an odd last batch is not
                        # timm's Mixup draws from numpy's global RNG: seeded per micro-batch, so a resumed run
                        # mixes exactly as an uninterrupted one
                        np.random.seed((spec.seed * 1_000_003 + epoch * batches_per_epoch + i) % 2**32)
                        xm, ym = mixer(x, y)
                        logits = logits_of(net, xm)
                        state.logits = None  # accuracy on mixed images means nothing: not counted
                        loss = soft_ce(logits.float(), ym)
                    else:
                        logits = logits_of(net, x)
                        state.logits = logits
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.label_smoothing)
                if not torch.isfinite(loss):
                    raise StudioError(
                        f"Training diverged (loss {loss.item()}) at epoch {epoch} step {state.step}. "
                        "Lower the learning rate."
                    )
                state.loss = loss
                # the mean over the group's micro-batches, as timm's train.py divides the last smaller group
                (loss / group if group > 1 else loss).backward()
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
                if state.logits is not None:
                    correct += int((state.logits.argmax(1) == y).sum())
                state.logits = None
                if pos < group - 1:
                    continue
                _call(hooks, "after_backward", state)
                if spec.grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], spec.grad_clip
                    )
                optimizer.step()
                state.step += 1
                if ema is not None:
                    ema.update(model, step=state.step)  # timm: the first update copies the weights
                _call(hooks, "after_step", state)
                acc.update(loss_sum=loss_sum, correct=correct, seen=seen)
                progress(
                    callbacks, "train", state.step, state.total_steps, epoch=epoch, loss=float(loss.detach())
                )
            skip = 0
            acc.update(loss_sum=0.0, correct=0, seen=0)
            if world > 1:  # every rank trained on its shard: report the whole epoch
                loss_sum, correct, seen = _all_sum(device, loss_sum, correct, seen)
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": loss_sum / max(1, seen),
                "lr": optimizer.param_groups[0]["lr"],
                "time": time.time() - t0,
            }
            if correct:
                record["train_top1"] = correct / max(1, seen)
            if val_data is not None and rank == 0:
                ev = evaluate(judged, val_data, batch_size=max(256, spec.batch_size))
                record.update(val_top1=ev.top1, val_loss=ev.loss)
                if best["top1"] is None or ev.top1 > best["top1"]:
                    best.update(
                        epoch=epoch,
                        top1=ev.top1,
                        weights={k: v.detach().clone() for k, v in judged.state_dict().items()},
                    )
                    since_best = 0
                else:
                    since_best += 1
            if world > 1 and val_data is not None:  # rank 0 evaluated: every rank takes the same decision
                since_best, val = _from_rank0(
                    since_best, {k: record.get(k) for k in ("val_top1", "val_loss")}
                )
                record.update(val)
            acc["since_best"] = since_best
            for extra in _call(hooks, "on_epoch_end", state):
                if isinstance(extra, dict):
                    record.update(extra)
            state.history.append(record)
            emit(callbacks, "metric", **record)
            if ckpt_path is not None and rank == 0:
                _save_checkpoint(ckpt_path, state, hooks, best, epoch + 1, 0, acc, ema)
            if spec.early_stop and since_best >= spec.early_stop:
                emit(callbacks, "log", message=f"early stop: no validation gain for {since_best} epochs")
                break
    except Cancelled:
        if world > 1:  # all ranks stop at the same step (the token is synchronised): save the group's sums
            acc["loss_sum"], acc["correct"], acc["seen"] = _all_sum(
                device, acc["loss_sum"], acc["correct"], acc["seen"]
            )
        if ckpt_path is not None and rank == 0:
            done_in_epoch = state.step - epoch * steps_per_epoch
            _save_checkpoint(ckpt_path, state, hooks, best, epoch, done_in_epoch, acc, ema)
        emit(callbacks, "status", state="cancelled", epoch=epoch, step=state.step)
        raise
    if spec.select == "val" and best["weights"] is not None:
        model.load_state_dict(best["weights"])
    elif ema is not None:  # the EMA weights are the result (timm validates and keeps them the same way)
        model.load_state_dict(ema.module.state_dict())
    if world > 1 and spec.select == "val" and val_data is not None:  # only rank 0 held the best weights
        import torch.distributed as dist

        for v in model.state_dict().values():
            dist.broadcast(v, src=0)
    if spec.grad_checkpointing:
        model.set_grad_checkpointing(False)  # the returned model runs as it came
    return TrainResult(
        epochs_run=len(state.history),
        steps=state.step,
        history=state.history,
        best_epoch=best["epoch"],
        best_val_top1=best["top1"],
        seconds=time.time() - t0,
    )


def _mixer(model: torch.nn.Module, spec: TrainSpec, hooks: Sequence[Any]) -> Mixup | None:
    """timm's Mixup/CutMix for ``spec`` (None when off); refused beside a hook that computes its own loss."""
    if not spec.mixes:
        return None
    if any(hasattr(h, "loss") for h in hooks):
        raise StudioError(
            "Mixup/CutMix works with the plain cross-entropy only, not with distillation or a method's own "
            "loss (P3B): set mixup and cutmix to 0, or distillation to none."
        )
    classes = getattr(model, "num_classes", None)
    if not isinstance(classes, int) or classes < 2:
        raise StudioError("Mixup/CutMix needs a classifier with a known number of classes (a timm model).")
    return Mixup(
        mixup_alpha=spec.mixup,
        cutmix_alpha=spec.cutmix,
        prob=spec.mix_prob,
        label_smoothing=spec.label_smoothing,
        num_classes=classes,
    )


def _all_sum(device: torch.device, *values: float) -> list[float | int]:
    """Sum per-rank numbers over the process group (multi-process training)."""
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [v if isinstance(v0, float) else int(v) for v, v0 in zip(t.tolist(), values)]


def _from_rank0(since_best: int, val: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Rank 0's validation result and patience counter, on every rank (early stop must agree)."""
    import torch.distributed as dist

    box = [(since_best, val)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _save_checkpoint(
    path: Path,
    state: TrainState,
    hooks: Sequence[Any],
    best: dict[str, Any],
    epoch: int,
    skip: int,
    acc: dict[str, Any] | None = None,
    ema: ModelEmaV3 | None = None,
) -> None:
    """Everything needed for an exact resume; read back with ``weights_only=True`` (no pickled objects)."""

    payload = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "epoch": epoch,
        "skip": skip,
        "step": state.step,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "acc": {k: float(v) for k, v in (acc or {}).items()},
        "history": copy.deepcopy(state.history),
        "best_epoch": -1 if best["epoch"] is None else best["epoch"],
        "best_top1": -1.0 if best["top1"] is None else best["top1"],
        "best_weights": best["weights"] or {},
        "hooks": [h.state_dict() for h in hooks if hasattr(h, "state_dict")],
        "ema": {} if ema is None else ema.module.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(
    path: Path,
    state: TrainState,
    hooks: Sequence[Any],
    best: dict[str, Any],
    acc: dict[str, Any] | None = None,
    ema: ModelEmaV3 | None = None,
) -> tuple[int, int]:
    try:
        # on the CPU: RNG states must stay CPU byte tensors; weights and optimizer state move to their device below
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged or foreign file
        raise StudioError(
            f"Checkpoint {path} cannot be read ({str(e)[:120]}). Delete it to start over."
        ) from None
    _check_payload(payload, path)
    try:  # a studio checkpoint of another model (structure) or optimizer (parameter groups)
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise StudioError(
            f"Checkpoint {path} was saved by another model or recipe than this run's ({first}); it cannot be "
            "resumed here: move it away to start over, or resume the run that wrote it."
        ) from None
    if ema is not None:
        if not payload.get("ema"):
            raise StudioError(
                f"Checkpoint {path} was saved without a weight EMA, but this run keeps one: resume it with the "
                "recipe that wrote it, or move the checkpoint away to start over."
            )
        ema.module.load_state_dict(payload["ema"])
    state.step = int(payload["step"])
    state.history = list(payload["history"])
    torch.set_rng_state(payload["rng"])
    if payload.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    if acc is not None:
        for k, v in payload.get("acc", {}).items():
            acc[k] = v if k == "loss_sum" else int(v)
    if payload["best_epoch"] >= 0:
        best.update(
            epoch=int(payload["best_epoch"]),
            top1=float(payload["best_top1"]),
            weights=payload["best_weights"],
        )
    device = next(state.model.parameters()).device
    for h, sd in zip([h for h in hooks if hasattr(h, "load_state_dict")], payload["hooks"]):
        h.load_state_dict(_to_device(sd, device))
    return int(payload["epoch"]), int(payload["skip"])


# what _save_checkpoint writes and _load_checkpoint reads without a default
_CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "epoch",
    "skip",
    "step",
    "rng",
    "history",
    "best_epoch",
    "best_top1",
    "best_weights",
    "hooks",
)


def _check_payload(payload: Any, path: Path) -> None:
    """Refuse a readable torch file that is not a training checkpoint of the studio (e.g. a bare state dict saved
    as ``checkpoint.pt``) in one sentence, instead of a ``KeyError`` half-way through restoring it."""
    if not isinstance(payload, dict):
        what = f"it holds a {type(payload).__name__}"
    elif missing := [k for k in _CHECKPOINT_KEYS if k not in payload]:
        what = f"it lacks {', '.join(repr(k) for k in missing[:4])}" + (
            " and more" if len(missing) > 4 else ""
        )
    elif not isinstance(payload["model"], dict):
        what = "its 'model' is not a state dict"
    else:
        return
    raise StudioError(
        f"Checkpoint {path} is not a training checkpoint written by the studio ({what}), so it cannot be "
        "resumed: move it away to start the run over, or give the run folder that wrote it."
    )


def _to_device(obj: Any, device: torch.device) -> Any:
    """Tensors inside nested dicts/lists moved to ``device`` (hook states are read on the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
