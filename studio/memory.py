"""Memory: what a piece of work will need before it starts, the micro-batch that keeps it bounded, and the
peak it then used.

Calibration (Taylor gradients, SAViT's gate scores and Hessian-vector products) stores activations for the
backward pass; on a ViT they grow linearly with the number of images in one forward pass and dominate
everything else (DeiT-S at 224 px: ~66 MB per image for a backward, against 88 MB of weights). The studio
therefore splits every calibration batch into *micro-batches* and accumulates (the batch, its count and its
loss stay the user's: the gradients are those of the whole batch), and picks the micro-batch from an
analytic activation model so that the activations stay under a budget.

The activation model counts the float32 tensors autograd keeps per block and image — measured on timm's
``Block`` (norms, qkv, attention output, projections, residuals, the MLP's hidden activations before and after
GELU, and for the explicit attention the logits and probabilities) — times a per-mode factor: ``forward``
(inference, one block's transients live at a time), ``backward`` (every block's saved tensors at once) and
``hessian`` (the backward graph itself kept for Hessian-vector products, as SAViT needs). The test suite checks
the estimate against measured peaks on two model sizes (within 30 %).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .costs import arch_facts
from .errors import StudioError
from .models import create_vit
from .plan import BaseArch

MODES = ("forward", "backward", "hessian")
# CPU: a micro-batch of 16 DeiT-S images already keeps two cores busy, so a larger one buys little speed and
# costs gigabytes; a GPU gets half of its free memory.
CPU_ACTIVATION_BUDGET = 2 * 2**30
GPU_BUDGET_FRACTION = 0.5
_ENV_BUDGET = "STUDIO_ACTIVATION_BUDGET_MB"
# Floats kept per token and block, fitted to measured peaks (see the module doc): width-D tensors, MLP-width
# tensors, and attention maps per head and query token (explicit attention only).
_PER_D, _PER_M, _PER_MAP = 10.0, 2.0, 2.0
_MODE_FACTOR = {"backward": 1.2, "hessian": 2.9}


@dataclass(frozen=True)
class Estimate:
    """What one piece of work is expected to hold at its peak, in bytes."""

    mode: str
    batch: int
    micro_batch: int
    weights: int
    activations: int  # for one micro-batch
    data: int  # the input batch itself

    @property
    def peak(self) -> int:
        # weights + their gradients (backward modes) + activations of one micro-batch + the batch's pixels
        grads = self.weights if self.mode != "forward" else 0
        return self.weights + grads + self.activations + self.data

    def describe(self) -> str:
        return (
            f"~{gib(self.peak)} peak ({self.mode}: weights {gib(self.weights)}, activations "
            f"{gib(self.activations)} for a micro-batch of {self.micro_batch} of {self.batch} images)"
        )

    def to_dict(self) -> dict[str, int | str]:
        return {
            "mode": self.mode,
            "batch": self.batch,
            "micro_batch": self.micro_batch,
            "weights_bytes": self.weights,
            "activation_bytes": self.activations,
            "peak_bytes": self.peak,
        }


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**29 else f"{n / 2**20:.0f} MiB"


def per_image(base: BaseArch, mode: str, *, explicit_attention: bool = True) -> int:
    """Activation bytes per image of one pass in ``mode`` (see the module doc for the model)."""
    if mode not in MODES:
        raise StudioError(f"Unknown memory mode '{mode}'; use one of {', '.join(MODES)}.")
    n = arch_facts(base).tokens
    blocks = [
        n * (_PER_D * base.embed_dim + _PER_M * m + (_PER_MAP * h * n if explicit_attention else 0))
        for h, m in zip(base.num_heads, base.mlp_hidden)
    ]
    if mode == "forward":
        # inference: the widest block's transients (its input and output are two of the width-D tensors)
        return int(4 * max(blocks) * 0.6)
    return int(4 * sum(blocks) * _MODE_FACTOR[mode])


def weight_bytes(base: BaseArch) -> int:
    with torch.device("meta"):
        m = create_vit(base.arch, **base.kwargs)
    return sum(p.numel() * p.element_size() for p in m.parameters())


def budget(device: torch.device) -> int:
    """Bytes the activations of one micro-batch may take on ``device`` (env override in MiB)."""
    if os.environ.get(_ENV_BUDGET):
        try:
            return max(1, int(float(os.environ[_ENV_BUDGET]) * 2**20))
        except ValueError:
            raise StudioError(f"{_ENV_BUDGET} must be a number of MiB.") from None
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_BUDGET_FRACTION)
    return min(CPU_ACTIVATION_BUDGET, available_bytes() // 2)


def micro_batch(
    base: BaseArch, batch: int, mode: str, device: torch.device, *, asked: int = 0, explicit: bool = True
) -> int:
    """The micro-batch for ``batch`` images in ``mode``: ``asked`` if given (> 0), else the largest that fits
    the activation budget (at least 1, at most ``batch``)."""
    if asked > 0:
        return min(asked, batch)
    fits = budget(device) // max(per_image(base, mode, explicit_attention=explicit), 1)
    return max(1, min(batch, int(fits)))


def estimate(
    base: BaseArch,
    batch: int,
    mode: str,
    device: torch.device,
    *,
    micro: int = 0,
    explicit: bool = True,
) -> Estimate:
    """The expected peak of a pass of ``batch`` images in ``mode`` split into micro-batches."""
    mb = micro_batch(base, batch, mode, device, asked=micro, explicit=explicit)
    facts = arch_facts(base)
    return Estimate(
        mode=mode,
        batch=batch,
        micro_batch=mb,
        weights=weight_bytes(base),
        activations=mb * per_image(base, mode, explicit_attention=explicit),
        data=4 * batch * facts.patches * facts.patch_pixels,  # float32 pixels
    )


def require_fits(est: Estimate, device: torch.device, what: str) -> None:
    """Refuse up front, with the estimate and what to change, work that cannot fit ``device``."""
    have = available_bytes() if device.type != "cuda" else torch.cuda.mem_get_info(device)[0]
    if est.peak > have:
        raise StudioError(
            f"{what} needs {est.describe()}, but only {gib(have)} is free on {device.type}: use a smaller "
            "--micro-batch or --batch-size, or a machine with more memory."
        )


# ------------------------------------------------------------------------------------------- measurement
def available_bytes() -> int:
    """MemAvailable of this machine (Linux), or the physical memory where /proc is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak(device: torch.device | None = None) -> None:
    """Start a new peak: the process's resident high-water mark (Linux ``clear_refs``) and CUDA's."""
    # not Linux or not permitted: the peak then counts from the process start
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device | None = None) -> dict[str, int]:
    """Peak resident memory since :func:`reset_peak` (``rss``) and, on CUDA, the peak allocated."""
    out: dict[str, int] = {}
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        out["rss"] = hwm * 1024
    else:
        import resource

        out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device is not None and device.type == "cuda":
        out["cuda"] = int(torch.cuda.max_memory_allocated(device))
    return out


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024
