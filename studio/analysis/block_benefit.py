"""Block benefit: how much each Attention and each MLP branch of a ViT lowers the loss of a linear probe.

Implements the Block Performance Indicator of "Pruning by Block Benefit" (P3B, Glandorf et al., arXiv
2506.23675). A ViT with L layers has 2L *blocks*, one per residual branch: block ``2i`` is layer i's Attention,
block ``2i+1`` its MLP, and block b maps the residual stream ``z_b`` to ``z_{b+1}``. Every block gets two probe
heads, shared between its input and its output: a CLS head (``Linear(C, K)`` on token 0) and a patch head. Both
are trained on *detached* features (stop-gradient: they never train the backbone), and the benefit of block b is

    ΔΨ_b = CE(h_b(z_b)) - CE(h_b(z_{b+1}))        (batch-mean cross-entropies, CLS and patch separately)

i.e. how much the block's output is easier to classify than its input. P3B averages ΔΨ over the steps between
two mask updates (a *window*); the studio also averages it per epoch for the benefit curves.

Taps (no ``forward`` is rewritten): forward-pre-hooks on ``blocks[i].norm1`` (input ``z_{2i}``), on
``blocks[i].norm2`` (input ``z_{2i+1}``, after the attention residual) and on ``model.norm`` (``z_{2L}``).

Patch heads:
- ``conv`` (the paper's): the patch tokens as a C×h×w map, ``[Conv3x3(C→C, no bias) → BatchNorm → ReLU] × 2``,
  global average pool, ``Linear(C, K)``. About ``2·9·C²`` weights per block: ≈ 64 M extra parameters on DeiT-S.
  All 2L heads run as one grouped convolution (``groups=2L``), which is exactly 2L independent convolutions.
- ``mean`` (a cheaper **deviation** from the paper): mean of the patch tokens, ``Linear(C, K)``.

The reference code keeps the model in eval mode while training (its quirk Q4), so its probes' BatchNorm acts as a
fixed affine map; here the probes train in train mode, as BatchNorm is meant to.

The second half of this module reads a finished or running P3B run's recorded benefits back
(:func:`load_history`) and recomputes the per-block keep ratios for any prune ratio (:func:`keep_ratios_at`);
the CLI ``analyze benefit`` and the studio's Block benefit page use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StudioError
from ..parallel import ParallelBlock
from ..runs import RunDir, list_runs
from .benefit_budget import BudgetSettings, importance_from_benefits, solve_keep_ratios

PROBES = ("conv", "mean")


def block_names(depth: int) -> list[str]:
    """``attn0, mlp0, attn1, mlp1, ...``: the 2L blocks in forward order."""
    return [f"{kind}{i}" for i in range(depth) for kind in ("attn", "mlp")]


# --------------------------------------------------------------------------------------------------- taps
class FeatureTaps:
    """Capture the residual stream ``z_0 .. z_{2L}`` of a timm ViT, detached, on every forward.

    Use as a context manager or call :meth:`remove`. ``features`` holds the last forward's 2L+1 tensors
    ``(B, N, C)``.
    """

    def __init__(self, model: nn.Module) -> None:
        blocks = list(model.blocks)  # type: ignore[attr-defined]
        if any(isinstance(b, ParallelBlock) for b in blocks):  # its norm2 never runs: no z_{2i+1} to tap
            raise StudioError(
                "Block benefit needs the residual stream between each attention and MLP branch; a parallel block "
                "(ParallelScalingBlock) has none. Analyse a model of sequential blocks."
            )
        self.depth = len(blocks)
        self.features: list[torch.Tensor | None] = [None] * (2 * self.depth + 1)
        self._handles = []
        for i, blk in enumerate(blocks):
            self._handles.append(blk.norm1.register_forward_pre_hook(self._tap(2 * i)))
            self._handles.append(blk.norm2.register_forward_pre_hook(self._tap(2 * i + 1)))
        self._handles.append(model.norm.register_forward_pre_hook(self._tap(2 * self.depth)))  # type: ignore[union-attr]

    def _tap(self, k: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.features[k] = args[0].detach()

        return hook

    def stacked(self) -> torch.Tensor:
        """The captured stream as one float tensor ``(2L+1, B, N, C)``."""
        if any(f is None for f in self.features):
            raise StudioError("No features captured yet: run a forward pass of the model first.")
        return torch.stack([f.float() for f in self.features])  # type: ignore[union-attr]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ------------------------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class ProbeLosses:
    """Batch-mean cross-entropies of every block's probes on its input and its output, shape ``(2L,)`` each."""

    cls_in: torch.Tensor
    cls_out: torch.Tensor
    patch_in: torch.Tensor
    patch_out: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """The probes' training loss (sum over blocks of all four CEs, as in the paper)."""
        return self.cls_in.sum() + self.cls_out.sum() + self.patch_in.sum() + self.patch_out.sum()

    def benefit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ΔΨ^c, ΔΨ^p)`` per block, detached."""
        return (self.cls_in - self.cls_out).detach(), (self.patch_in - self.patch_out).detach()


class BenefitProbes(nn.Module):
    """The 2L pairs of probe heads (CLS and patch) of P3B, evaluated in one batched pass.

    Args:
        depth: transformer layers L (2L blocks).
        dim: width C of the residual stream.
        num_classes: K.
        grid: patch grid ``(h, w)`` (needed by the conv probe).
        num_prefix_tokens: tokens before the patches (1 for ViT, 2 for distilled DeiT).
        patch_probe: ``conv`` (paper) or ``mean`` (cheap deviation).
        seed: seed of the heads' initialisation (the global RNG is left untouched, so a run is reproducible).
    """

    def __init__(
        self,
        depth: int,
        dim: int,
        num_classes: int,
        grid: tuple[int, int],
        *,
        num_prefix_tokens: int = 1,
        patch_probe: str = "conv",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if patch_probe not in PROBES:
            raise StudioError(f"Patch probe must be one of {', '.join(PROBES)}, not {patch_probe!r}.")
        n = 2 * depth
        self.blocks, self.dim, self.num_classes = n, dim, num_classes
        self.grid, self.num_prefix_tokens, self.patch_probe = tuple(grid), num_prefix_tokens, patch_probe
        self.cls_weight = nn.Parameter(torch.empty(n, num_classes, dim))
        self.cls_bias = nn.Parameter(torch.zeros(n, num_classes))
        self.patch_weight = nn.Parameter(torch.empty(n, num_classes, dim))
        self.patch_bias = nn.Parameter(torch.zeros(n, num_classes))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for w in (self.cls_weight, self.patch_weight):
                for i in range(n):  # nn.Linear's default init, per head
                    nn.init.kaiming_uniform_(w[i], a=5**0.5)
            if patch_probe == "conv":
                c = n * dim
                self.conv = nn.Sequential(
                    nn.Conv2d(c, c, 3, padding=1, groups=n, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c, c, 3, padding=1, groups=n, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                )

    @classmethod
    def for_model(cls, model: nn.Module, *, patch_probe: str = "conv", seed: int = 0) -> BenefitProbes:
        """Probes sized for a timm VisionTransformer (on its device)."""
        grid = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr]
        probes = cls(
            len(model.blocks),  # type: ignore[arg-type]
            int(model.embed_dim),  # type: ignore[arg-type]
            int(model.num_classes),  # type: ignore[arg-type]
            grid,  # type: ignore[arg-type]
            num_prefix_tokens=int(model.num_prefix_tokens),  # type: ignore[arg-type]
            patch_probe=patch_probe,
            seed=seed,
        )
        return probes.to(next(model.parameters()).device)

    def _heads(self, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``(2L, B, C)`` features, one linear head per block -> ``(2L, B, K)`` logits."""
        return torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))

    def _patch_features(self, z: torch.Tensor) -> torch.Tensor:
        """``(2L, B, N, C)`` block-aligned stream -> ``(2L, B, C)`` pooled patch features."""
        patches = z[:, :, self.num_prefix_tokens :]
        if self.patch_probe == "mean":
            return patches.mean(2)
        n, b, p, c = patches.shape
        h, w = self.grid
        if p != h * w:
            raise StudioError(f"The conv probe needs {h}x{w} patch tokens, got {p}.")
        x = patches.permute(1, 0, 3, 2).reshape(b, n * c, h, w)  # block-major channels: one group per block
        x = self.conv(x).mean((2, 3))
        return x.view(b, n, c).transpose(0, 1)

    def forward(self, stream: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0) -> ProbeLosses:
        """Probe CEs from the captured stream ``(2L+1, B, N, C)`` (detached) and labels ``(B,)``."""
        stream = stream.detach()
        n = self.blocks
        if stream.shape[0] != n + 1:
            raise StudioError(f"Expected {n + 1} captured feature maps, got {stream.shape[0]}.")
        out = {}
        for side, z in (("in", stream[:-1]), ("out", stream[1:])):
            cls_logits = self._heads(z[:, :, 0], self.cls_weight, self.cls_bias)
            patch_logits = self._heads(self._patch_features(z), self.patch_weight, self.patch_bias)
            for kind, logits in (("cls", cls_logits), ("patch", patch_logits)):
                ce = F.cross_entropy(
                    logits.reshape(-1, self.num_classes),
                    y.repeat(n),
                    reduction="none",
                    label_smoothing=label_smoothing,
                )
                out[f"{kind}_{side}"] = ce.view(n, -1).mean(1)
        return ProbeLosses(**out)


# -------------------------------------------------------------------------------------------- accumulation
class BenefitMeter:
    """Running sums of ΔΨ^c and ΔΨ^p per block (a window or an epoch); ``mean()`` gives the averages."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.reset()

    def reset(self) -> None:
        self.cls = torch.zeros(self.blocks, dtype=torch.float64)
        self.patch = torch.zeros(self.blocks, dtype=torch.float64)
        self.count = 0

    def add(self, cls: torch.Tensor, patch: torch.Tensor) -> None:
        self.cls += cls.detach().double().cpu()
        self.patch += patch.detach().double().cpu()
        self.count += 1

    def merged(self, other: BenefitMeter) -> BenefitMeter:
        m = BenefitMeter(self.blocks)
        m.cls, m.patch, m.count = self.cls + other.cls, self.patch + other.patch, self.count + other.count
        return m

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        n = max(1, self.count)
        return (self.cls / n).numpy(), (self.patch / n).numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"cls": self.cls.clone(), "patch": self.patch.clone(), "count": self.count}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.cls, self.patch, self.count = sd["cls"].double(), sd["patch"].double(), int(sd["count"])


# ------------------------------------------------------------------------------------ reading a run back
SETUP_EVENT = "p3b_setup"
EPOCH_EVENT = "p3b"
FINAL_EVENT = "p3b_final"


@dataclass(frozen=True)
class BenefitHistory:
    """What a P3B run recorded, as arrays ``(epochs, 2L)``, for the curves and the budget slider.

    ``kappa`` is the target keep ratio the budget gave at the end of each epoch, ``kappa_applied`` the ramped
    ratio the masks used, ``kept_params`` the parameters each block kept under the hard masks.
    """

    names: list[str]
    block_params: list[int]
    non_block_params: int
    settings: dict[str, Any]
    epochs: list[int]
    benefit_cls: np.ndarray
    benefit_patch: np.ndarray
    kappa: np.ndarray
    kappa_applied: np.ndarray
    kept_params: np.ndarray
    theta: list[float]
    final: dict[str, Any] = field(default_factory=dict)
    gate_sizes: list[list[int]] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.names) // 2

    def curve_rows(self) -> list[dict[str, Any]]:
        """Long-form rows ``epoch, block, layer, branch (Attention/MLP), token (CLS/patch), benefit`` for charts."""
        rows = []
        for r, ep in enumerate(self.epochs):
            for b, name in enumerate(self.names):
                for token, arr in (("CLS", self.benefit_cls), ("patch", self.benefit_patch)):
                    rows.append(
                        {
                            "epoch": ep,
                            "block": name,
                            "layer": b // 2,
                            "branch": "Attention" if b % 2 == 0 else "MLP",
                            "token": token,
                            "benefit": float(arr[r, b]),
                            "keep_ratio": float(self.kappa_applied[r, b]),
                            "kept_params": int(self.kept_params[r, b]),
                        }
                    )
        return rows

    def grid(self, token: str = "CLS") -> tuple[list[str], list[int], np.ndarray]:
        """(blocks, epochs, benefit matrix blocks × epochs) of one token kind, for a heatmap."""
        arr = self.benefit_cls if token == "CLS" else self.benefit_patch
        return list(self.names), list(self.epochs), arr.T.copy()

    def structure_rows(self) -> list[dict[str, Any]]:
        """The final hard masks per block: kept elements of each gate and their fraction (empty before slicing)."""
        rows = []
        for b, (name, kept) in enumerate(zip(self.names, self.final.get("structure", []))):
            sizes = self.gate_sizes[b] if b < len(self.gate_sizes) else [None] * len(kept)
            for (gate, n), size in zip(kept.items(), sizes):
                rows.append(
                    {
                        "block": name,
                        "layer": b // 2,
                        "gate": gate,
                        "kept": n,
                        "of": size,
                        "fraction": n / size if size else None,
                    }
                )
        return rows

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                d[k] = v.tolist()
        return d


def history_from_events(events: Sequence[dict[str, Any]]) -> BenefitHistory:
    """Build the history from a run's ``events.jsonl`` records (latest record per epoch wins, e.g. after resume)."""
    setup = next((e["data"] for e in reversed(events) if e.get("kind") == SETUP_EVENT), None)
    if setup is None:
        raise StudioError(
            "This run has no block-benefit records: pick a P3B run (python -m studio prune --method p3b ...)."
        )
    per_epoch: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.get("kind") == EPOCH_EVENT:
            per_epoch[int(e["data"]["epoch"])] = e["data"]
    final = next((e["data"] for e in reversed(events) if e.get("kind") == FINAL_EVENT), {})
    epochs = sorted(per_epoch)
    n = len(setup["names"])

    def arr(key: str) -> np.ndarray:
        if not epochs:
            return np.zeros((0, n))
        return np.array([per_epoch[ep][key] for ep in epochs], dtype=np.float64)

    return BenefitHistory(
        names=list(setup["names"]),
        block_params=[int(v) for v in setup["block_params"]],
        non_block_params=int(setup["non_block_params"]),
        settings=dict(setup.get("settings", {})),
        epochs=epochs,
        benefit_cls=arr("benefit_cls"),
        benefit_patch=arr("benefit_patch"),
        kappa=arr("kappa"),
        kappa_applied=arr("kappa_applied"),
        kept_params=arr("kept_params"),
        theta=[float(per_epoch[ep].get("theta", 0.0)) for ep in epochs],
        final=dict(final),
        gate_sizes=[list(g) for g in setup.get("gate_sizes", [])],
    )


def load_history(run: str | Path | Any) -> BenefitHistory:
    """The recorded benefits of a run folder (a path or a :class:`~studio.runs.RunDir`)."""

    rd = run if isinstance(run, RunDir) else RunDir(Path(run))
    if not rd.path.is_dir():
        raise StudioError(f"Run folder {rd.path} does not exist.")
    return history_from_events(rd.events())


def is_p3b_run(run: Any) -> bool:
    """Whether a run folder holds a P3B job (its spec says so, or it recorded block benefits)."""
    try:
        spec = run.spec()
    except StudioError:
        return False
    return spec.get("method") == "p3b"


def p3b_runs(root: str | Path) -> list[Any]:
    """Every P3B run under ``root``, newest first."""

    return [r for r in list_runs(root) if is_p3b_run(r)]


def keep_ratios_at(
    history: BenefitHistory,
    prune_ratio: float,
    *,
    epoch: int | None = None,
    block_params_only: bool | None = None,
) -> dict[str, Any]:
    """Per-block keep ratios the P3B budget gives for ``prune_ratio`` from one epoch's recorded benefits.

    A one-shot allocation (what-if): the epoch-mean benefits of ``epoch`` (default the last recorded) through the
    P3B transform with the unpruned block sizes as kept parameters and no EMA, then the water-filling solve. The
    run itself smoothed window means over its mask updates, so at its own prune ratio the result is close to,
    not equal to, the ``kappa`` it recorded.
    """
    if not history.epochs:
        raise StudioError("The run has not recorded any epoch yet; wait for the first epoch to finish.")
    ep = history.epochs[-1] if epoch is None else int(epoch)
    if ep not in history.epochs:
        raise StudioError(
            f"Epoch {ep} has no benefit record; recorded epochs are {history.epochs[0]}..{history.epochs[-1]}."
        )
    row = history.epochs.index(ep)
    settings = BudgetSettings.from_dict(history.settings)
    only = settings.block_params_only if block_params_only is None else block_params_only
    W = np.asarray(history.block_params, dtype=np.float64)
    w_non = 0 if only else history.non_block_params
    imp = importance_from_benefits(history.benefit_cls[row], history.benefit_patch[row], W, settings)
    kappa = solve_keep_ratios(imp, W, w_non, prune_ratio, min_keep=settings.min_keep)
    return {
        "epoch": ep,
        "prune_ratio": prune_ratio,
        "names": history.names,
        "benefit_cls": history.benefit_cls[row].tolist(),
        "benefit_patch": history.benefit_patch[row].tolist(),
        "importance": imp.tolist(),
        "keep_ratio": kappa.tolist(),
        "block_params": history.block_params,
        "kept_params": [round(float(k * w)) for k, w in zip(kappa, W)],
        "non_block_params": history.non_block_params,
        "params_after": float((kappa * W).sum() + history.non_block_params),
        "params_total": float(W.sum() + history.non_block_params),
        "recorded_kappa": history.kappa[row].tolist(),
        "rows": [
            {
                "block": n,
                "branch": "Attention" if b % 2 == 0 else "MLP",
                "keep ratio": float(kappa[b]),
                "run's κ": float(history.kappa[row, b]),
                "params": int(W[b]),
                "kept params": round(float(kappa[b] * W[b])),
            }
            for b, n in enumerate(history.names)
        ],
    }
