"""Multi-process training with DistributedDataParallel, launched by ``torchrun`` (NCCL on GPUs, gloo on CPU).

``torchrun --nproc_per_node N -m studio run runs/NAME`` starts N copies of the command; torchrun gives
each its ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address. :func:`setup` joins the process
group from those variables (a plain ``python -m studio`` run sees none and stays single-process), :func:`wrap`
puts the model in DDP, and the training loop (:func:`studio.train.fit`) shards every epoch with its seeded
``EpochSampler``. Only rank 0 writes events, checkpoints and results, so a run directory looks the same whatever
the number of processes. Cancelling (the run's ``CANCEL`` file) is agreed on by all ranks at the same step
(:class:`SyncedCancel`), otherwise the ranks that stopped would leave the others waiting in a collective.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .device import resolve_device
from .errors import StudioError
from .events import CancelToken

ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and emits events."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def env_world() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise StudioError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer.") from None


def setup(device: str = "auto", *, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes, or return a single-process context.

    Args:
        device: ``auto`` (GPUs when present), ``cpu`` or ``cuda``. Under torchrun every process takes GPU
            ``LOCAL_RANK``; an explicit ``cuda:N`` index is ignored there.
    """
    world = env_world()
    if world == 1:
        return DistContext(0, 1, 0, resolve_device(device))
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise StudioError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set: start multi-process runs with torchrun "
            "(torchrun --nproc_per_node N -m studio retrain ...)."
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    kind = resolve_device(device).type if device not in (None, "", "auto") else None
    if kind is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise StudioError(
                f"Process {local_rank} of this node has no GPU: {n} visible. Use --nproc_per_node {n} or less, "
                "or --device cpu (gloo)."
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, dev, backend)


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module | None:
    """The DDP wrapper to train through (None when single-process). Set ``requires_grad`` before calling."""
    if not ctx.distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def average_(tensors: Sequence[torch.Tensor | None], ctx: DistContext | None) -> None:
    """Replace each tensor, in place, by its mean over the ranks (one all-reduce of a flat buffer); a
    single-process context leaves them as they are. For the state a method keeps outside the DDP model
    (P3B's gate gradients, probe gradients and benefits), which DDP does not synchronise."""
    ts = [t for t in tensors if t is not None]
    if ctx is None or not ctx.distributed or not ts:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in ts])
    dist.all_reduce(flat)
    flat /= ctx.world
    i = 0
    for t in ts:
        n = t.numel()
        t.copy_(flat[i : i + n].view_as(t).to(t.dtype))
        i += n


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


class SyncedCancel(CancelToken):
    """A cancel token every rank reads identically: set on any rank means set on all, at the same step.

    Each read is one tiny all-reduce (MAX), so read it exactly once per step on every rank (as ``fit`` does).
    """

    def __init__(self, token: CancelToken, ctx: DistContext) -> None:
        super().__init__(token.flag_file)
        self._inner, self._ctx = token, ctx

    def set(self) -> None:
        self._inner.set()

    @property
    def is_set(self) -> bool:
        flag = torch.tensor([1 if self._inner.is_set else 0], device=self._ctx.device)
        if self._ctx.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self._inner.set()
        return bool(flag.item())


def params_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, in order: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather(value: str, ctx: DistContext) -> list[str]:
    """Every rank's ``value`` (rank order), collected on all ranks (``[value]`` single-process)."""
    if not ctx.distributed:
        return [value]
    out: list[str | None] = [None] * ctx.world
    dist.all_gather_object(out, value)
    return [str(d) for d in out]


def gather_digests(model: torch.nn.Module, ctx: DistContext) -> list[str]:
    """Every rank's :func:`params_digest` (rank order), collected on all ranks."""
    return gather(params_digest(model), ctx)
