"""The SLS depth-cut rule (Han & Tang, "Straightforward Layer-wise Pruning for More Efficient Visual
Adaptation", ECCV 2024, arXiv 2407.14330).

Given one separability score per layer (the silhouette coefficient of the layer's CLS tokens against the true
labels, layers numbered 1..N), SLS scans from the top: the threshold is ``T = α · SC_N``; walking down from
layer N-1, every layer with ``SC_ℓ ≥ T`` is passed, and the scan **stops at the first failing layer** even if a
lower layer rises above ``T`` again. The kept depth is the lowest passed layer::

    L* = min{ ℓ : SC_k ≥ α · SC_N  for every k in [ℓ, N] }

Blocks ``1..L*`` are kept and ``N - L*`` are removed. A larger α raises the threshold and removes fewer layers.

Guard (pitfall P2 of the reference code): with ``SC_N < 0`` the set above is empty — the reference code breaks
before writing a target and then reads a stale or missing file. Here the whole model is kept and the reason is
stated. Pure Python, no dependencies: cheap to call on every slider move.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import StudioError

DEFAULT_ALPHA = 0.3


@dataclass(frozen=True)
class Cut:
    """The result of the SLS scan.

    Attributes:
        keep: ``L*``, the number of blocks kept (layers are 1-based, so blocks ``0..keep-1`` stay).
        depth: ``N``, the number of layers scanned.
        alpha: the threshold factor.
        threshold: ``α · SC_N``.
        scores: the per-layer scores, layer 1 first.
        passed: per layer, whether the top-down scan passed it (True for ``keep..N``).
        stopped_at: the 1-based layer where the scan stopped (the first failure), None if it reached layer 1.
        reason: one sentence explaining the cut, for the CLI and the UI.
    """

    keep: int
    depth: int
    alpha: float
    threshold: float
    scores: tuple[float | None, ...]
    passed: tuple[bool, ...]
    stopped_at: int | None
    reason: str

    @property
    def removed(self) -> int:
        return self.depth - self.keep

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"], d["passed"] = list(self.scores), list(self.passed)
        d["removed"] = self.removed
        return d


def _check(scores: Sequence[float | None], alpha: float) -> list[float | None]:
    s = [None if v is None else float(v) for v in scores]
    if not s:
        raise StudioError("The SLS cut needs at least one layer score.")
    if s[-1] is None:
        raise StudioError("The SLS cut needs the last layer's score (the reference of the threshold).")
    bad = [i + 1 for i, v in enumerate(s) if v is not None and not math.isfinite(v)]
    if bad:
        raise StudioError(
            f"Layer {bad[0]} has no finite separability score; recompute the analysis "
            "(it needs at least two classes with two samples each)."
        )
    if not (isinstance(alpha, int | float) and 0.0 <= float(alpha) <= 1.0):
        raise StudioError(f"SLS alpha must lie in [0, 1] (the paper uses 0.3), got {alpha!r}.")
    return s


def sls_cut(scores: Sequence[float | None], alpha: float = DEFAULT_ALPHA) -> Cut:
    """Apply the SLS top-down scan to per-layer scores (layer 1 first) and return the cut.

    Scores below the layer where the scan stops are never read, so they may be None (not computed): the
    paper's code embeds layers lazily from the top and stops at the first failure.
    """
    s = _check(scores, alpha)
    n = len(s)
    top = s[-1]
    assert top is not None
    threshold = alpha * top
    if top < 0:
        return Cut(
            keep=n,
            depth=n,
            alpha=float(alpha),
            threshold=threshold,
            scores=tuple(s),
            passed=(False,) * n,
            stopped_at=n,
            reason=(
                f"The last layer's score is negative ({top:.3f}): its classes do not separate, so the α rule "
                "has no reference; keeping all layers (the reference code fails here, pitfall P2)."
            ),
        )
    keep, stopped = n, None
    for layer in range(n - 1, 0, -1):  # 1-based layers N-1 .. 1
        v = s[layer - 1]
        if v is None:
            raise StudioError(
                f"The scan reached layer {layer}, whose score was not computed; compute it (or all layers)."
            )
        if v >= threshold:
            keep = layer
        else:
            stopped = layer
            break
    passed = tuple(i + 1 >= keep for i in range(n))
    if stopped is None:
        reason = (
            f"Every layer scores at least α·SC_{n} = {threshold:.3f}; the scan reached layer 1: keep 1 block."
        )
    else:
        reason = (
            f"Layer {stopped} scores {s[stopped - 1] or 0.0:.3f} < α·SC_{n} = {alpha:g}·{top:.3f} = {threshold:.3f}: "
            f"the scan stops there, keeping blocks 1..{keep} and removing {n - keep}."
        )
    return Cut(
        keep=keep,
        depth=n,
        alpha=float(alpha),
        threshold=threshold,
        scores=tuple(s),
        passed=passed,
        stopped_at=stopped,
        reason=reason,
    )


def closed_form(scores: Sequence[float], alpha: float = DEFAULT_ALPHA) -> int | None:
    """``min{ℓ : SC_k ≥ α·SC_N ∀ k ∈ [ℓ, N]}`` (1-based), or None when the set is empty (``SC_N < 0``).

    An independent statement of the rule, used to test :func:`sls_cut`.
    """
    s = _check(scores, alpha)
    if any(v is None for v in s):
        raise StudioError("The closed form needs every layer's score.")
    n, t = len(s), alpha * s[-1]  # type: ignore[operator]
    ok = [ell for ell in range(1, n + 1) if all(s[k - 1] >= t for k in range(ell, n + 1))]  # type: ignore[operator]
    return min(ok) if ok else None
