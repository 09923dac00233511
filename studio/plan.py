"""The pruning plan: the one structure every method produces and one surgery applies.

A plan names, by index into the *base* model, what to keep: the blocks (depth), and per kept block the
heads, the dims inside each kept head, the MLP hidden neurons and the residual channels each branch reads and
writes; plus the embedding channels kept for the whole model. ``None`` always means "keep all".

Head dims: timm's ``Attention`` reshapes ``qkv`` into ``(3, H, d)``, so q, k and v of every head share one
head width. A plan therefore keeps one list of dims per block, applied to q, k and v of every kept head (this is
what P3B's shared qkv gate and Isomorphic pruning's per-layer head-dim scope produce).

Residual channel subsets (P3B) and the global embedding subset (SAViT, Isomorphic) are both given in the base
model's channel indices; a block's subsets must lie inside the kept embedding channels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import StudioError

SCHEMA = "pruning-studio/plan"
VERSION = 1
_RESIDUAL_FIELDS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
Indices = tuple[int, ...] | None


@dataclass(frozen=True)
class BaseArch:
    """The unpruned architecture a plan refers to (enough to rebuild it with timm and to validate indices)."""

    arch: str
    kwargs: dict[str, Any]
    depth: int
    embed_dim: int
    num_heads: tuple[int, ...]
    head_dim: int
    mlp_hidden: tuple[int, ...]
    num_classes: int
    num_prefix_tokens: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "kwargs": dict(self.kwargs),
            "depth": self.depth,
            "embed_dim": self.embed_dim,
            "num_heads": list(self.num_heads),
            "head_dim": self.head_dim,
            "mlp_hidden": list(self.mlp_hidden),
            "num_classes": self.num_classes,
            "num_prefix_tokens": self.num_prefix_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseArch:
        try:
            return cls(
                arch=str(d["arch"]),
                kwargs=dict(d.get("kwargs", {})),
                depth=int(d["depth"]),
                embed_dim=int(d["embed_dim"]),
                num_heads=tuple(int(h) for h in d["num_heads"]),
                head_dim=int(d["head_dim"]),
                mlp_hidden=tuple(int(h) for h in d["mlp_hidden"]),
                num_classes=int(d["num_classes"]),
                num_prefix_tokens=int(d.get("num_prefix_tokens", 1)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StudioError(f"Plan field 'base' is incomplete or malformed ({e}).") from None


@dataclass(frozen=True)
class BlockPlan:
    """What one kept block keeps. ``index`` is the block's position in the base model."""

    index: int
    heads: Indices = None
    head_dims: Indices = None
    mlp: Indices = None
    attn_in: Indices = None
    attn_out: Indices = None
    mlp_in: Indices = None
    mlp_out: Indices = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index}
        for name in ("heads", "head_dims", "mlp", *_RESIDUAL_FIELDS):
            v = getattr(self, name)
            d[name] = None if v is None else list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockPlan:
        def idx(name: str) -> Indices:
            v = d.get(name)
            if v is None:
                return None
            if not isinstance(v, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in v
            ):
                raise StudioError(
                    f"Plan field 'blocks[{d.get('index')}].{name}' must be a list of integers or null."
                )
            return tuple(v)

        if not isinstance(d.get("index"), int):
            raise StudioError("Every entry of plan field 'blocks' needs an integer 'index'.")
        return cls(index=d["index"], **{n: idx(n) for n in ("heads", "head_dims", "mlp", *_RESIDUAL_FIELDS)})

    @property
    def is_dense(self) -> bool:
        return all(getattr(self, n) is None for n in ("heads", "head_dims", "mlp", *_RESIDUAL_FIELDS))


@dataclass(frozen=True)
class PrunePlan:
    """The exact structure to keep, with the method and parameters that chose it.

    Attributes:
        base: the unpruned architecture.
        blocks: kept blocks in order; a base block that is absent is removed (depth pruning).
        embed: kept embedding (residual-stream) channels of the whole model, or None for all.
        method: the method that produced the plan (``sls``, ``p3b``, ``savit``, ``isomorphic``, ...).
        params: the method's parameters, for provenance and replay.
        scale_policy: attention temperature after head-dim pruning: ``keep`` the base ``1/sqrt(d)``
            (default: the pruned model computes the same function on the kept dims) or ``reset`` to
            ``1/sqrt(d_kept)`` (what Isomorphic's reference code does before fine-tuning).
        summary: params/MACs before and after, filled by the method.
    """

    base: BaseArch
    blocks: tuple[BlockPlan, ...]
    embed: Indices = None
    method: str = "manual"
    params: dict[str, Any] = field(default_factory=dict)
    scale_policy: str = "keep"
    summary: dict[str, Any] = field(default_factory=dict)

    # construction -------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, base: BaseArch, *, method: str = "dense") -> PrunePlan:
        """A plan that keeps everything (its surgery must reproduce the base logits exactly)."""
        return cls(base=base, blocks=tuple(BlockPlan(i) for i in range(base.depth)), method=method)

    def with_(self, **changes: Any) -> PrunePlan:
        return replace(self, **changes)

    def block(self, index: int) -> BlockPlan | None:
        """The plan of base block ``index``, or None if that block is removed."""
        for b in self.blocks:
            if b.index == index:
                return b
        return None

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def is_dense(self) -> bool:
        """True if the plan keeps every block and unit (applying it changes nothing)."""
        return (
            self.embed is None
            and len(self.blocks) == self.base.depth
            and all(b.is_dense for b in self.blocks)
        )

    # validation ---------------------------------------------------------------------------------------
    def validate(self) -> PrunePlan:
        """Check every index against the base; raise :class:`StudioError` naming the bad field."""
        base = self.base
        if self.scale_policy not in ("keep", "reset"):
            raise StudioError(
                f"Plan field 'scale_policy' must be 'keep' or 'reset', not {self.scale_policy!r}."
            )
        if not self.blocks:
            raise StudioError("Plan field 'blocks' is empty: a model needs at least one block.")
        _check_indices("embed", self.embed, base.embed_dim)
        embed = set(range(base.embed_dim)) if self.embed is None else set(self.embed)
        last = -1
        for b in self.blocks:
            where = f"blocks[{b.index}]"
            if not 0 <= b.index < base.depth:
                raise StudioError(
                    f"Plan field '{where}.index' = {b.index} is out of range 0..{base.depth - 1}."
                )
            if b.index <= last:
                raise StudioError(
                    f"Plan field 'blocks' must list block indices once each, in increasing order "
                    f"(got {b.index} after {last})."
                )
            last = b.index
            _check_indices(f"{where}.heads", b.heads, base.num_heads[b.index])
            _check_indices(f"{where}.head_dims", b.head_dims, base.head_dim)
            _check_indices(f"{where}.mlp", b.mlp, base.mlp_hidden[b.index])
            for name in _RESIDUAL_FIELDS:
                sub = getattr(b, name)
                _check_indices(f"{where}.{name}", sub, base.embed_dim)
                if sub is not None and not set(sub) <= embed:
                    raise StudioError(
                        f"Plan field '{where}.{name}' uses channels outside 'embed' "
                        f"(e.g. {sorted(set(sub) - embed)[:3]})."
                    )
        return self

    # (de)serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "method": self.method,
            "params": dict(self.params),
            "scale_policy": self.scale_policy,
            "base": self.base.to_dict(),
            "embed": None if self.embed is None else list(self.embed),
            "blocks": [b.to_dict() for b in self.blocks],
            "summary": dict(self.summary),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunePlan:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise StudioError(f"Not a pruning plan: field 'schema' must be '{SCHEMA}'.")
        if d.get("version") != VERSION:
            raise StudioError(
                f"Plan field 'version' is {d.get('version')!r}; this studio reads version {VERSION}."
            )
        if not isinstance(d.get("blocks"), list):
            raise StudioError("Plan field 'blocks' must be a list.")
        embed = d.get("embed")
        if embed is not None and (not isinstance(embed, list) or not all(isinstance(i, int) for i in embed)):
            raise StudioError("Plan field 'embed' must be a list of integers or null.")
        plan = cls(
            base=BaseArch.from_dict(d.get("base") or {}),
            blocks=tuple(BlockPlan.from_dict(b) for b in d["blocks"]),
            embed=None if embed is None else tuple(embed),
            method=str(d.get("method", "manual")),
            params=dict(d.get("params") or {}),
            scale_policy=str(d.get("scale_policy", "keep")),
            summary=dict(d.get("summary") or {}),
        )
        return plan.validate()

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise StudioError(f"Plan is not valid JSON (line {e.lineno}: {e.msg}).") from None

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        path = Path(path)
        if not path.is_file():
            raise StudioError(f"Plan file {path} does not exist.")
        return cls.from_json(path.read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> None:
        from .runs import write_text

        write_text(path, self.to_json() + "\n")

    # reading ------------------------------------------------------------------------------------------
    def kept(self, index: int) -> dict[str, int]:
        """Kept counts of base block ``index`` (zeros if the block is removed)."""
        b = self.block(index)
        base = self.base
        if b is None:
            return {"heads": 0, "head_dim": 0, "mlp": 0}
        return {
            "heads": base.num_heads[index] if b.heads is None else len(b.heads),
            "head_dim": base.head_dim if b.head_dims is None else len(b.head_dims),
            "mlp": base.mlp_hidden[index] if b.mlp is None else len(b.mlp),
        }

    def describe(self) -> str:
        """A readable table of the kept structure."""
        base = self.base
        width = base.embed_dim if self.embed is None else len(self.embed)
        lines = [
            f"Plan '{self.method}' on {base.arch}: {self.depth}/{base.depth} blocks, embed {width}/{base.embed_dim}"
            + (f", scale policy '{self.scale_policy}'" if any(b.head_dims for b in self.blocks) else ""),
            f"{'block':>5}  {'heads':>7}  {'head dim':>8}  {'mlp':>11}  {'attn in/out':>11}  {'mlp in/out':>11}",
        ]
        for i in range(base.depth):
            b = self.block(i)
            if b is None:
                lines.append(f"{i:>5}  removed")
                continue
            k = self.kept(i)

            def res(v: Indices) -> str:
                return str(width if v is None else len(v))

            lines.append(
                f"{i:>5}  {k['heads']:>3}/{base.num_heads[i]:<3}  {k['head_dim']:>4}/{base.head_dim:<3}  "
                f"{k['mlp']:>5}/{base.mlp_hidden[i]:<5}  {res(b.attn_in) + '/' + res(b.attn_out):>11}  "
                f"{res(b.mlp_in) + '/' + res(b.mlp_out):>11}"
            )
        s = self.summary
        if "params_before" in s and "params_after" in s:
            lines.append(f"params {s['params_before']:,} -> {s['params_after']:,}")
        if "macs_before" in s and "macs_after" in s:
            lines.append(f"MACs   {s['macs_before']:,} -> {s['macs_after']:,}")
        return "\n".join(lines)


def _check_indices(name: str, idx: Sequence[int] | None, size: int) -> None:
    if idx is None:
        return
    if len(idx) == 0:
        raise StudioError(
            f"Plan field '{name}' is empty: keeping zero units empties the layer. "
            "Remove the whole block instead, or keep at least one."
        )
    if len(set(idx)) != len(idx):
        raise StudioError(f"Plan field '{name}' has duplicate indices.")
    bad = [i for i in idx if not 0 <= i < size]
    if bad:
        raise StudioError(f"Plan field '{name}' has index {bad[0]} out of range 0..{size - 1}.")
    if list(idx) != sorted(idx):
        raise StudioError(f"Plan field '{name}' must be sorted in increasing order.")


def diff(a: PrunePlan, b: PrunePlan) -> list[str]:
    """Human-readable differences between two plans on the same base (empty list: same structure)."""
    out: list[str] = []
    if a.base.arch != b.base.arch or a.base.embed_dim != b.base.embed_dim or a.base.depth != b.base.depth:
        out.append(
            f"base differs: {a.base.arch} ({a.base.depth}x{a.base.embed_dim}) vs "
            f"{b.base.arch} ({b.base.depth}x{b.base.embed_dim})"
        )
        return out
    if a.method != b.method:
        out.append(f"method: {a.method} -> {b.method}")
    ea = a.base.embed_dim if a.embed is None else len(a.embed)
    eb = b.base.embed_dim if b.embed is None else len(b.embed)
    if a.embed != b.embed:
        out.append(f"embed: {ea} -> {eb} channels")
    for i in range(a.base.depth):
        ba, bb = a.block(i), b.block(i)
        if (ba is None) != (bb is None):
            out.append(
                f"block {i}: {'removed' if ba is None else 'kept'} -> {'removed' if bb is None else 'kept'}"
            )
            continue
        if ba is None or bb is None or ba == bb:
            continue
        ka, kb = a.kept(i), b.kept(i)
        for name in ("heads", "head_dim", "mlp"):
            if ka[name] != kb[name]:
                out.append(f"block {i}: {name} {ka[name]} -> {kb[name]}")
        for name in ("heads", "head_dims", "mlp", *_RESIDUAL_FIELDS):
            va, vb = getattr(ba, name), getattr(bb, name)
            if va != vb and (name in _RESIDUAL_FIELDS or ka.get(name) == kb.get(name)):
                out.append(f"block {i}: {name} selection differs")
    return out
