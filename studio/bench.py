"""Honest measurement: parameters, MACs counted at the dispatcher, and measured throughput/latency.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2) with timm's fused attention
switched off while counting, because the counter does not see CPU fused SDPA kernels; attention matmuls (bmm)
are reported separately from linear layers (mm/addmm) and the patch-embedding convolution.
Throughput follows the usual protocol: warm-up, device synchronize, ``inference_mode``, fixed shapes, median
of repeats, device and dtype recorded.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .backends import BACKENDS
from .errors import StudioError
from .events import Callback, CancelToken, check, progress

_ATTENTION_OPS = {
    "bmm",
    "baddbmm",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
}
_LINEAR_OPS = {"mm", "addmm"}
_CONV_OPS = {"convolution", "_convolution"}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def unfused_attention(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily use timm's explicit attention math (counted exactly, supports double backward)."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield
    finally:
        for m, v in saved:
            m.fused_attn = v


def count_macs(model: torch.nn.Module, input_size: Sequence[int], *, batch_size: int = 1) -> dict[str, int]:
    """MACs of one forward pass per image, split into attention matmuls, linear layers and convolutions."""
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, *input_size[-3:], device=device)
    # a copy: the model may be the studio's shared cached one, which two sessions must never see flipped
    # (attention flags, train/eval) while the other one times or trains it
    model = copy.deepcopy(model).eval()
    counter = FlopCounterMode(display=False)
    # frozen: a module called on a view of a parameter (the attention pool's latent query) would hand the
    # counter's module tracker a tensor that requires grad but has no grad_fn
    model.requires_grad_(False)
    with unfused_attention(model), torch.inference_mode(), counter:
        model(x)
    by_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[1] if "." in str(op) else str(op)
        by_op[name] = by_op.get(name, 0) + int(n)
    total = sum(by_op.values()) // 2 // batch_size
    attention = sum(v for k, v in by_op.items() if k in _ATTENTION_OPS) // 2 // batch_size
    linear = sum(v for k, v in by_op.items() if k in _LINEAR_OPS) // 2 // batch_size
    conv = sum(v for k, v in by_op.items() if k in _CONV_OPS) // 2 // batch_size
    return {
        "total": total,
        "attention": attention,
        "linear": linear,
        "conv": conv,
        "other": total - attention - linear - conv,
    }


def load_avg() -> float:
    """The machine's 1-minute load average, recorded beside every speed figure (figures measured under
    different load are not comparable)."""
    return round(os.getloadavg()[0], 2)


@dataclass(frozen=True)
class ThroughputResult:
    """Measured speed of one model at one batch size."""

    batch_size: int
    images_per_s: float
    latency_ms: float  # median time of one batch
    latency_ms_p90: float
    device: str
    dtype: str
    repeats: int
    warmup: int
    backend: str = "eager"  # the runtime it was timed on (studio.backends)
    threads: int = field(default_factory=torch.get_num_threads)
    # the machine's 1-minute load when measured: figures taken under different load are not comparable
    load_avg: float = field(default_factory=load_avg)

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Prepared:
    """A model readied once on a backend for a fixed input: ``run()`` is one timed pass."""

    run: Callable[[], Any]
    device: torch.device
    batch_size: int
    dtype: str
    backend: str


def prepare(
    model: torch.nn.Module,
    input_size: Sequence[int],
    *,
    batch_size: int = 1,
    dtype: torch.dtype | None = None,
    backend: str = "eager",
) -> Prepared:
    """Ready ``model`` (in evaluation mode) on ``backend`` for a random batch; refuses a dtype the backend lacks."""
    runtime = BACKENDS.get(backend)
    dtype_name = str(dtype or torch.float32).removeprefix("torch.")
    if not runtime.supports(dtype_name):
        raise StudioError(
            f"The {backend} backend times {' or '.join(runtime.dtypes)} only, not {dtype_name}: pick another "
            "dtype or the eager backend."
        )
    device = next(model.parameters()).device
    x = torch.randn(batch_size, *input_size[-3:], device=device)
    return Prepared(runtime.prepare(model.eval(), x, dtype), device, batch_size, dtype_name, backend)


def time_prepared(
    p: Prepared,
    *,
    warmup: int,
    repeats: int,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> ThroughputResult:
    """The one measuring protocol: ``warmup`` passes, then the median (and p90) of ``repeats`` timed passes,
    each between device synchronisations."""
    times: list[float] = []
    for i in range(warmup + repeats):
        check(cancel)
        _sync(p.device)
        t0 = time.perf_counter()
        p.run()
        _sync(p.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        progress(callbacks, f"throughput bs{p.batch_size}", i + 1, warmup + repeats)
    med = statistics.median(times)
    p90 = sorted(times)[max(0, round(0.9 * len(times)) - 1)]
    return ThroughputResult(
        batch_size=p.batch_size,
        images_per_s=p.batch_size / med,
        latency_ms=med * 1e3,
        latency_ms_p90=p90 * 1e3,
        device=str(p.device),
        dtype=p.dtype,
        repeats=repeats,
        warmup=warmup,
        backend=p.backend,
    )


def measure_throughput(
    model: torch.nn.Module,
    input_size: Sequence[int],
    *,
    batch_size: int = 1,
    warmup: int = 10,
    repeats: int = 30,
    dtype: torch.dtype | None = None,
    backend: str = "eager",
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> ThroughputResult:
    """Median wall time of ``repeats`` forward passes after ``warmup`` ones (SLS protocol: 50 + 100 at batch 1).

    Args:
        dtype: autocast dtype (e.g. ``torch.bfloat16`` on CUDA); None measures float32.
        backend: the runtime (:data:`studio.backends.BACKENDS`) the model is prepared for once and timed on.
    """
    was_training = model.training
    try:
        p = prepare(model, input_size, batch_size=batch_size, dtype=dtype, backend=backend)
        return time_prepared(p, warmup=warmup, repeats=repeats, callbacks=callbacks, cancel=cancel)
    finally:
        model.train(was_training)


def paired_speedup(
    dense: torch.nn.Module,
    pruned: torch.nn.Module,
    input_size: Sequence[int],
    batch_size: int,
    warmup: int,
    repeats: int,
    dtype: torch.dtype | None = None,
    backend: str = "eager",
) -> float:
    """Median over ``repeats`` of (dense time / pruned time), each pair timed back to back on ``backend``.

    Pairing cancels slow drifts in CPU contention (other processes on a shared machine), which otherwise bias a
    ratio of two medians taken minutes apart. Each model is prepared once (an ONNX export, a compilation).
    """
    a = prepare(dense, input_size, batch_size=batch_size, dtype=dtype, backend=backend)
    b = prepare(pruned, input_size, batch_size=batch_size, dtype=dtype, backend=backend)
    for p in (a, b):
        time_prepared(p, warmup=warmup, repeats=1)
    ratios = []
    for _ in range(repeats):
        t_dense = time_prepared(a, warmup=0, repeats=1).latency_ms
        t_pruned = time_prepared(b, warmup=0, repeats=1).latency_ms
        ratios.append(t_dense / t_pruned)
    return statistics.median(ratios)


def profile(model: torch.nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """Params and MACs in one dict (``params``, ``macs``, ``macs_attention``, ``macs_linear``, ``macs_conv``)."""
    macs = count_macs(model, input_size)
    return {
        "params": count_params(model),
        "macs": macs["total"],
        "macs_attention": macs["attention"],
        "macs_linear": macs["linear"],
        "macs_conv": macs["conv"],
    }
