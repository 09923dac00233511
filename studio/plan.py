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

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import StudioError
from .runs import write_text

SCHEMA = "pruning-studio/plan"
VERSION = 1
_RESIDUAL_FIELDS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
_INDEX_FIELDS = ("heads", "head_dims", "mlp", *_RESIDUAL_FIELDS)
Indices = tuple[int, ...] | None
# Bounds on a base's sizes, checked before anything is sized by them (a typo like ``embed_dim: 1000000000``
# must be refused at once, not allocate a billion-entry set). Generous: ViT-22B has 48 blocks, width 6,144,
# MLP 24,576 and 48 heads.
MAX_DIM = 65_536
MAX_DEPTH = 4_096
MAX_CLASSES = 1_000_000


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

    def check(self) -> BaseArch:
        """Check types, bounds and that the per-block lists match ``depth``; raise naming the bad field."""
        if not isinstance(self.arch, str) or not self.arch:
            raise StudioError("Plan field 'base.arch' must be a timm architecture name.")
        if not isinstance(self.kwargs, Mapping):
            raise StudioError("Plan field 'base.kwargs' must be an object of timm constructor arguments.")
        _check_int("base.depth", self.depth, 1, MAX_DEPTH)
        _check_int("base.embed_dim", self.embed_dim, 1, MAX_DIM)
        _check_int("base.head_dim", self.head_dim, 1, MAX_DIM)
        _check_int("base.num_classes", self.num_classes, 0, MAX_CLASSES)  # 0: a backbone without a head
        _check_int("base.num_prefix_tokens", self.num_prefix_tokens, 0, MAX_DIM)
        for name in ("num_heads", "mlp_hidden"):
            sizes = getattr(self, name)
            if len(sizes) != self.depth:
                raise StudioError(
                    f"Plan field 'base.{name}' has {len(sizes)} entries but 'base.depth' is {self.depth}: "
                    "give one per block."
                )
            for i, n in enumerate(sizes):
                _check_int(f"base.{name}[{i}]", n, 1, MAX_DIM)
        return self

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
        _check_fields("base", d, [f.name for f in fields(cls)])
        missing = [
            f.name for f in fields(cls) if f.name not in ("kwargs", "num_prefix_tokens") and f.name not in d
        ]
        if missing:
            raise StudioError(f"Plan field 'base' is incomplete: it needs '{missing[0]}'.")
        for name in ("num_heads", "mlp_hidden"):
            if not isinstance(d[name], list | tuple):
                raise StudioError(f"Plan field 'base.{name}' must be a list of integers, one per block.")
        kwargs = d.get("kwargs", {})
        return cls(
            arch=d["arch"],
            kwargs=dict(kwargs) if isinstance(kwargs, Mapping) else kwargs,
            depth=d["depth"],
            embed_dim=d["embed_dim"],
            num_heads=tuple(d["num_heads"]),
            head_dim=d["head_dim"],
            mlp_hidden=tuple(d["mlp_hidden"]),
            num_classes=d["num_classes"],
            num_prefix_tokens=d.get("num_prefix_tokens", 1),
        ).check()


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
        if not isinstance(d, dict):
            raise StudioError("Every entry of plan field 'blocks' must be an object with an integer 'index'.")
        # type(...) is int: JSON true/false are Python bools, a subclass of int, so isinstance would take
        # "index": true for block 1
        if type(d.get("index")) is not int:
            raise StudioError(
                f"Every entry of plan field 'blocks' needs an integer 'index' (got {d.get('index')!r})."
            )
        where = f"blocks[{d['index']}]"
        # a misspelt field (e.g. "head" for "heads") used to be ignored, leaving that block silently dense
        _check_fields(where, d, ["index", *_INDEX_FIELDS])
        return cls(index=d["index"], **{n: _indices(f"{where}.{n}", d.get(n)) for n in _INDEX_FIELDS})

    @property
    def is_dense(self) -> bool:
        return all(getattr(self, n) is None for n in _INDEX_FIELDS)


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
    def made_for(self, base: BaseArch) -> PrunePlan:
        """This plan, refused (one sentence) unless it was made for ``base``: a plan slices a model's indices, so
        on another architecture it would cut the wrong units."""
        if self.base.to_dict() != base.to_dict():
            b = self.base
            raise StudioError(
                f"This plan was made for {b.arch} ({b.depth} blocks, width {b.embed_dim}, {b.num_classes} "
                f"classes), not for the current model ({base.arch}, {base.depth} blocks, width "
                f"{base.embed_dim}, {base.num_classes} classes). Load the model it was made for first."
            )
        return self

    def validate(self) -> PrunePlan:
        """Check every index against the base; raise :class:`StudioError` naming the bad field."""
        base = self.base.check()  # bounds first: every later check is sized by the base
        if self.scale_policy not in ("keep", "reset"):
            raise StudioError(
                f"Plan field 'scale_policy' must be 'keep' or 'reset', not {self.scale_policy!r}."
            )
        if not self.blocks:
            raise StudioError("Plan field 'blocks' is empty: a model needs at least one block.")
        _check_indices("embed", self.embed, base.embed_dim)
        embed = None if self.embed is None else set(self.embed)  # None: all channels, checked by range
        last = -1
        for b in self.blocks:
            where = f"blocks[{b.index}]"
            if type(b.index) is not int:
                raise StudioError(f"Plan field '{where}.index' must be an integer, not {b.index!r}.")
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
                if sub is not None and embed is not None and not set(sub) <= embed:
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
        if type(d.get("version")) is not int or d["version"] != VERSION:
            raise StudioError(
                f"Plan field 'version' is {d.get('version')!r}; this studio reads version {VERSION}."
            )
        _check_fields("", d, ["schema", "version", *(f.name for f in fields(cls))])
        if not isinstance(d.get("blocks"), list):
            raise StudioError("Plan field 'blocks' must be a list.")
        for name in ("params", "summary"):
            if not isinstance(d.get(name) or {}, dict):
                raise StudioError(f"Plan field '{name}' must be an object or null.")
        for name in ("method", "scale_policy"):
            if name in d and not isinstance(d[name], str):
                raise StudioError(f"Plan field '{name}' must be a string.")
        base = BaseArch.from_dict({} if d.get("base") is None else d["base"])
        if len(d["blocks"]) > base.depth:  # before parsing each entry: at most one per base block
            raise StudioError(
                f"Plan field 'blocks' lists {len(d['blocks'])} blocks but the base has only {base.depth}."
            )
        plan = cls(
            base=base,
            blocks=tuple(BlockPlan.from_dict(b) for b in d["blocks"]),
            embed=_indices("embed", d.get("embed")),
            method=d.get("method", "manual"),
            params=dict(d.get("params") or {}),
            scale_policy=d.get("scale_policy", "keep"),
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


def _check_fields(where: str, d: Any, valid: Sequence[str]) -> None:
    """Refuse a non-object or a field the plan format does not have, naming it, a likely fix and the valid ones."""
    if not isinstance(d, dict):
        raise StudioError(f"Plan field '{where}' must be an object.")
    for key in d:
        if key not in valid:
            name = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise StudioError(
                f"Plan field '{name}' is unknown; {hint}valid fields{' of ' + repr(where) if where else ''} "
                f"are {', '.join(valid)}."
            )


def _check_int(name: str, v: Any, low: int, high: int) -> None:
    # type(v) is int refuses JSON true/false (bool subclasses int), floats like 48.7 and strings like "48"
    if type(v) is not int:
        raise StudioError(f"Plan field '{name}' must be an integer, not {v!r}.")
    if not low <= v <= high:
        raise StudioError(f"Plan field '{name}' = {v:,} is out of range {low}..{high:,}.")


def _indices(name: str, v: Any) -> Indices:
    """A JSON index list as a tuple (None stays None: keep all), refusing anything but a list of integers."""
    if v is None:
        return None
    if not isinstance(v, list | tuple) or not all(type(i) is int for i in v):
        raise StudioError(f"Plan field '{name}' must be a list of integers or null.")
    return tuple(v)


def _check_indices(name: str, idx: Sequence[int] | None, size: int) -> None:
    if idx is None:
        return
    if len(idx) > size:  # checked before building a set of it: longer than the layer means duplicates anyway
        raise StudioError(
            f"Plan field '{name}' lists {len(idx):,} indices but the layer has only {size}: keep at most {size}."
        )
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
        for name in _INDEX_FIELDS:
            va, vb = getattr(ba, name), getattr(bb, name)
            if va != vb and (name in _RESIDUAL_FIELDS or ka.get(name) == kb.get(name)):
                out.append(f"block {i}: {name} selection differs")
    return out
