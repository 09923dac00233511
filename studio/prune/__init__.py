"""Pruning methods: a method either turns (model, calibration batches, parameters) into a :class:`PrunePlan`,
or declares the flow it trains as (P3B, SPLoRA prune while training: :mod:`studio.flows`).

A method is registered by name in :data:`METHODS` with the options it takes, declared as data
(:class:`Option`), and the budgets it understands (:class:`Budget`: a MACs target, a prune ratio, a unit
density, SLS's α ...), so the CLI adds a flag per option (``prune --method X --OPTION V`` or ``--param
OPTION=V``) and the Prune page draws exactly the method's budget and a widget per option, without either
being edited. Adding a method::

    from studio.prune import MACS, METHODS, Method, Option, PruneRequest

    def my_method(req: PruneRequest, *, callbacks=(), cancel=None) -> PrunePlan: ...

    METHODS.add("mine", Method("mine", my_method, "one line for --help", budgets=(MACS,),
                               options=(Option("alpha", float, 0.5, "threshold"),), needs_data=True))

``needs_data`` may instead be a function of the resolved options (``lambda p: p["importance"] == "taylor"``):
the CLI, the flow and the Prune page ask :meth:`Method.data_needed` with the options of the run.

Every module of this package is imported by :func:`load_methods`, so a new file here is all it takes.
The common budget options (:data:`COMMON_OPTIONS`: ``target_macs``, ``ratio``, ``round_to``) reach a method
only if it declares them (its budgets, and ``rounds`` for ``round_to``); giving one it does not take is
refused with the method's own options listed.
"""

from __future__ import annotations

import copy
import importlib
import math
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from .. import latency
from ..analysis.criteria import accumulate_gradients
from ..backends import BACKENDS
from ..costs import arch_facts, with_summary
from ..errors import StudioError
from ..events import Callback, CancelToken
from ..families import UNITS, prunable_units
from ..latency import profile_latency
from ..memory import MODES
from ..models import LoadedModel
from ..petl import width_refusal
from ..plan import PrunePlan
from ..registry import Registry
from ..surgery import apply_plan

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Option:
    """One parameter of a method: CLI flag ``--name`` (underscores as dashes) and a UI widget."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None

    def parse(self, value: Any) -> Any:
        """Convert a CLI/JSON value to the option's type, checking choices; raise naming the option."""
        if value is None:
            return None
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                v: Any = value.lower() in ("1", "true", "yes")
            else:
                v = self.type(value)
        except (TypeError, ValueError):
            raise StudioError(f"Option '{self.name}' needs a {self.type.__name__}, got {value!r}.") from None
        if self.choices is not None and v not in self.choices:
            raise StudioError(
                f"Option '{self.name}' must be one of {', '.join(map(str, self.choices))}, not {v!r}."
            )
        if isinstance(v, float) and v != v:
            raise StudioError(f"Option '{self.name}' must be a number, not NaN.")
        if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
            lo = "" if self.low is None else f"at least {self.low:g}"
            hi = "" if self.high is None else f"at most {self.high:g}"
            raise StudioError(
                f"Option '{self.name}' must be {' and '.join(p for p in (lo, hi) if p)}, got {v}."
            )
        return v

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "help": self.help,
            "choices": None if self.choices is None else list(self.choices),
        }


COMMON_OPTIONS: tuple[Option, ...] = (
    Option(
        "target_macs",
        float,
        None,
        "fraction of the base MACs to keep (e.g. 0.5); solved for, within ±2%",
    ),
    Option(
        "ratio",
        float,
        None,
        "fraction of units to remove in each pruned scope (ignored with target_macs)",
        low=0.0,
        high=1.0,
    ),
    Option(
        "round_to",
        int,
        1,
        "round kept widths (MLP, head dims, embedding) up to a multiple of this, e.g. 8",
        low=1,
        high=1024,
    ),
    Option(
        "target_latency",
        float,
        None,
        "fraction of the dense model's measured latency to keep (e.g. 0.7), on this device at latency_batch "
        "with latency_backend; solved with a latency model fitted to timed variants (studio.latency)",
        low=0.01,
        high=1.0,
    ),
    Option("latency_batch", int, 1, "batch size the latency target is for", low=1, high=4096),
    Option(
        "latency_backend",
        str,
        "eager",
        "runtime the latency target is for",
        choices=tuple(BACKENDS.names()),
    ),
    Option(
        "latency_dtype",
        str,
        "float32",
        "dtype the latency target is for (autocast; bfloat16/float16 as deployed on a GPU)",
        choices=("float32", "bfloat16", "float16"),
    ),
)
LATENCY_OPTIONS = ("latency_batch", "latency_backend", "latency_dtype")


@dataclass(frozen=True)
class PruneRequest:
    """What a method receives.

    Attributes:
        loaded: the unpruned model (never mutated by a method: deep-copy it to compute gradients).
        params: the method's options and the common ones, resolved (defaults filled in).
        batches: calibration batches ``(images, labels)`` on the model's device; empty if the method needs none.
        seed: seed for anything random.
        micro_batch: images per calibration pass (0: the largest within the activation budget,
            :mod:`studio.memory`); gradients accumulate to the whole batch's either way.
    """

    loaded: LoadedModel
    params: Mapping[str, Any] = field(default_factory=dict)
    batches: Sequence[Batch] = ()
    seed: int = 0
    micro_batch: int = 0
    cost: Callable[[PrunePlan], float] | None = None  # fraction of the base a plan costs (None: MACs)

    def target(self) -> float | None:
        """The fraction a solver aims at: ``target_latency`` (with :attr:`cost` the latency model's) or
        ``target_macs``."""
        p = self.params
        t = p.get("target_latency") if p.get("target_latency") is not None else p.get("target_macs")
        return None if t is None else float(t)

    def gradients(
        self, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None
    ) -> dict[str, torch.Tensor]:
        """∂L/∂w summed over the calibration batches, micro-batched (on a copy: the model is not touched)."""
        return accumulate_gradients(
            self.loaded.model,
            self.batches,
            micro_batch=self.micro_batch,
            base=self.loaded.base,
            callbacks=callbacks,
            cancel=cancel,
        )


class MethodFn(Protocol):
    def __call__(
        self, req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None
    ) -> PrunePlan: ...


@dataclass(frozen=True)
class Budget:
    """A budget a method understands: the option it sets and the range the Prune page offers for it."""

    option: str
    label: str
    low: float
    high: float | None  # None: the model's depth (a count of blocks)
    default: float
    step: float

    @property
    def whole(self) -> bool:
        """A count (blocks to keep), not a fraction."""
        return self.step >= 1

    def bounds(self, depth: int) -> tuple[float, float, float]:
        """``(low, high, default)`` for a model of ``depth`` blocks."""
        high = float(depth) if self.high is None else self.high
        return self.low, high, min(self.default, high)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_CALIB_BATCHES = 8  # calibration batches of a method that states no need of its own (CPU-sized)

MACS = Budget("target_macs", "Fraction of the MACs to keep", 0.1, 1.0, 0.5, 0.05)
LATENCY = Budget("target_latency", "Fraction of the measured latency to keep", 0.1, 1.0, 0.7, 0.05)
RATIO = Budget("ratio", "Fraction of units to remove in each scope", 0.0, 0.95, 0.3, 0.05)


@dataclass(frozen=True)
class Method:
    """A registered pruning method.

    Attributes:
        name: registry name (``prune --method NAME``).
        fn: ``fn(request, *, callbacks, cancel) -> PrunePlan``; None for a method that trains while it prunes.
        summary: one line shown in ``--help`` and the UI.
        options: the method's own parameters (beyond :data:`COMMON_OPTIONS`).
        needs_data: whether it needs calibration batches (labels included): a bool, or a function of the
            resolved options for a method whose need depends on them (Isomorphic with ``l2`` importance, SLS
            with ``keep_blocks`` given); ask :meth:`data_needed`, not this field.
        budgets: the budgets it understands, the first being the default the Prune page shows.
        rounds: whether it honours ``round_to`` (hardware-friendly widths).
        flow: the flow kind it runs as: ``prune`` (plan -> surgery -> measure), or its own training flow.
        check: raises :class:`StudioError` for a bad combination of resolved options (its return value is
            ignored), so that a spec is refused before a job starts, not by the job.
        calibration: what its calibration pass keeps in memory (:data:`studio.memory.MODES`): ``forward``
            (features only), ``backward`` (gradients) or ``hessian`` (the graph kept for Hessian products).
        calib_need: the calibration batches it draws when ``--calib-batches`` is not given, as a function of
            its resolved options and the batch size (SLS: enough for its ``samples``; SAViT: its
            ``hvp_batches``); None: :data:`DEFAULT_CALIB_BATCHES`.
        units: the plan units it can remove with some setting of its options (:data:`studio.families.UNITS`).
        unit_refusals: for a model, the units this method cannot prune exactly in it (a family variant its
            paper has no rule for), each with the sentence that says so; asked before any work starts
            (:meth:`refuse`, for the units the run's options select) and shown on the Model page.
        selects: the units a run with the given resolved options prunes (its ``scope``); None: all ``units``.
    """

    name: str
    fn: MethodFn | None
    summary: str
    options: tuple[Option, ...] = ()
    needs_data: bool | Callable[[Mapping[str, Any]], bool] = False
    budgets: tuple[Budget, ...] = (MACS, RATIO)
    rounds: bool = True
    flow: str = "prune"
    check: Callable[[Mapping[str, Any]], object] | None = None
    calibration: str = "backward"
    calib_need: Callable[[Mapping[str, Any], int], int] | None = None
    units: tuple[str, ...] = ("heads", "head_dims", "mlp", "embed")
    unit_refusals: Callable[[torch.nn.Module], Mapping[str, str]] | None = None
    selects: Callable[[Mapping[str, Any]], Sequence[str]] | None = None

    def __post_init__(self) -> None:
        if not self.units or set(self.units) - set(UNITS):
            raise ValueError(f"method '{self.name}': units must be some of {UNITS}, not {self.units}")
        if (self.fn is None) == (self.flow == "prune"):
            raise ValueError(
                f"method '{self.name}': give a plan function, or the flow it trains as (not both)"
            )
        own = {o.name for o in (*COMMON_OPTIONS, *self.options)}
        missing = [b.option for b in self.budgets if b.option not in own]
        if not self.budgets or missing:
            raise ValueError(f"method '{self.name}': budgets must name its options, not {missing}")
        if self.calibration not in MODES:
            raise ValueError(f"method '{self.name}': calibration must be one of {MODES}")

    def refused_units(self, model: torch.nn.Module) -> Mapping[str, str]:
        """The units of ``model`` this method cannot prune exactly, each with the reason (every width unit of a
        model carrying PETL adapters, which the surgery would not slice)."""
        out = dict(self.unit_refusals(model)) if self.unit_refusals is not None else {}
        if (why := width_refusal(model)) is not None:
            out.update({u: why for u in self.units if u != "blocks" and u not in out})
        return out

    def refuse(self, model: torch.nn.Module, params: Mapping[str, Any] | None = None) -> None:
        """Raise, as one :class:`StudioError` sentence, why a run with ``params`` cannot prune ``model``."""
        refused = self.refused_units(model)
        if not refused:
            return
        full = {o.name: o.default for o in self.accepted}
        full.update({k: v for k, v in (params or {}).items() if v is not None})
        chosen = self.selects(full) if self.selects is not None else self.units
        for unit in chosen:
            if unit in refused:
                raise StudioError(refused[unit])

    def data_needed(self, params: Mapping[str, Any] | None = None) -> bool:
        """Whether a run with ``params`` (given or resolved; missing ones take their defaults) needs
        calibration batches."""
        if not callable(self.needs_data):
            return bool(self.needs_data)
        full = {o.name: o.default for o in self.accepted}
        full.update({k: v for k, v in (params or {}).items() if v is not None})
        return bool(self.needs_data(full))

    def calib_batches(
        self, params: Mapping[str, Any] | None, batch_size: int, given: int | None = None
    ) -> int:
        """Calibration batches a run draws: ``given`` (``--calib-batches``), else the method's own need."""
        if given is not None:
            return int(given)
        if self.calib_need is None:
            return DEFAULT_CALIB_BATCHES
        full = {o.name: o.default for o in self.accepted}
        full.update({k: v for k, v in (params or {}).items() if v is not None})
        try:
            return max(1, int(self.calib_need(full, max(1, int(batch_size)))))
        except (TypeError, ValueError):  # an unparsed bad value: validate() refuses it with its own sentence
            return DEFAULT_CALIB_BATCHES

    @property
    def trains(self) -> bool:
        """Whether it trains while pruning (a job with checkpoints, not a one-shot plan)."""
        return self.flow != "prune"

    @property
    def accepted(self) -> tuple[Option, ...]:
        """Every option it takes: the common ones it declares, then its own."""
        common = {b.option for b in self.budgets} | ({"round_to"} if self.rounds else set())
        if "target_latency" in common:
            common |= set(LATENCY_OPTIONS)
        return (*(o for o in COMMON_OPTIONS if o.name in common), *self.options)

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults + given values (parsed), refusing names that are not options of this method."""
        opts = {o.name: o for o in self.accepted}
        unknown = sorted(n for n, v in given.items() if n not in opts and v is not None)
        if unknown:
            raise StudioError(
                f"Method '{self.name}' has no option '{unknown[0]}'. Its options: {', '.join(sorted(opts))}."
            )
        params = {n: o.parse(given[n]) if given.get(n) is not None else o.default for n, o in opts.items()}
        if self.check is not None:
            self.check(params)
        return params


METHODS: Registry[Method] = Registry("pruning method")


def load_methods() -> Registry[Method]:
    """Import every module of this package (each registers its methods) and return :data:`METHODS`."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return METHODS


def get_method(name: str) -> Method:
    return load_methods().get(name)


def prunable_by_method(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """For each registered method, the units of ``model`` it can prune: its own units that every family
    variant of the model allows (:func:`studio.families.prunable_units`)."""
    allowed = set(prunable_units(model))
    out = {}
    for n, m in load_methods().items():
        refused = m.refused_units(model)
        out[n] = tuple(u for u in UNITS if u in allowed and u in m.units and u not in refused)
    return out


def require_unpruned(loaded: LoadedModel) -> LoadedModel:
    """The model, refused if it is already pruned: every method plans on the unpruned base."""
    if loaded.plan is not None and not loaded.plan.is_dense:
        raise StudioError(
            "This model is already pruned (it was loaded from a pruned export). Methods plan on an "
            "unpruned model: load its base checkpoint, or export the unpruned model first."
        )
    return loaded


def latency_cost(
    loaded: LoadedModel,
    params: Mapping[str, Any],
    *,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> tuple[Callable[[PrunePlan], float], dict[str, Any]]:
    """The latency model of ``loaded`` on its device (fitted, or from the cache) as a solver's cost: a plan's
    predicted latency as a fraction of the dense model's, and what the plan records of it."""
    batch, backend = int(params.get("latency_batch") or 1), str(params.get("latency_backend") or "eager")
    dtype = str(params.get("latency_dtype") or "float32")
    lm = profile_latency(
        loaded.model,
        loaded.base,
        loaded.data_config["input_size"],
        batch=batch,
        backend=backend,
        dtype=dtype,
        callbacks=callbacks,
        cancel=cancel,
    )
    facts = arch_facts(loaded.base)
    dense = lm.predict(PrunePlan.dense(loaded.base), facts)
    record = {
        "target_latency": float(params["target_latency"]),
        "dense_measured_ms": round(lm.dense_ms, 4),
        "dense_predicted_ms": round(dense, 4),
        "fit_error": round(lm.fit_error, 4),
        "batch": batch,
        "backend": backend,
        "dtype": dtype,
        "variants": lm.variants,
    }
    return (lambda p: lm.predict(p, facts) / dense), record


def make_plan(
    name: str, req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None
) -> PrunePlan:
    """Run method ``name`` with its options resolved, validate the plan and fill its summary (params/MACs)."""

    method = get_method(name)
    if method.fn is None:
        raise StudioError(
            f"Method '{name}' trains while it prunes, so it runs as the '{method.flow}' flow (a job), not as a "
            f"one-shot plan: python -m studio prune --method {name} --data D --out runs/NAME (or the Prune page)."
        )
    params = method.resolve(req.params)
    if method.data_needed(params) and not req.batches:
        raise StudioError(f"Method '{name}' needs calibration data: give --data (and --calib-batches > 0).")
    require_unpruned(req.loaded)
    method.refuse(req.loaded.model, params)
    cost, latency = req.cost, None
    if params.get("target_latency") is not None and cost is None:
        cost, latency = latency_cost(req.loaded, params, callbacks=callbacks, cancel=cancel)
    plan = method.fn(
        PruneRequest(req.loaded, params, req.batches, req.seed, req.micro_batch, cost),
        callbacks=callbacks,
        cancel=cancel,
    )
    if latency is not None:
        assert cost is not None
        plan, cost = _close_latency_loop(method, req, params, plan, cost, latency, callbacks, cancel)
        latency["predicted_ms"] = round(latency["dense_predicted_ms"] * cost(plan), 4)
        plan = plan.with_(params={**plan.params, "latency": latency})
    return with_summary(plan.validate())


def _scaled(cost: Callable[[PrunePlan], float], k: float) -> Callable[[PrunePlan], float]:
    return lambda p: k * cost(p)


LATENCY_TOL = 0.03  # a measured latency within 3 % of its target ends the correction rounds
LATENCY_ROUNDS = 3  # solves at most: the latency model's, then up to two corrected by measurement


def _close_latency_loop(
    method: Method,
    req: PruneRequest,
    params: Mapping[str, Any],
    plan: PrunePlan,
    cost: Callable[[PrunePlan], float],
    record: dict[str, Any],
    callbacks: Sequence[Callback],
    cancel: CancelToken | None,
) -> tuple[PrunePlan, Callable[[PrunePlan], float]]:
    """Measure the solved plan and, while it misses its target by more than :data:`LATENCY_TOL`, scale the
    latency model by measured / predicted at that plan and solve again (the model's linear terms miss what
    kernels do at a given width: a local correction where the plan lands). Each round is recorded in
    ``record["rounds"]``; the plan measured closest to the target is kept."""
    target = float(params["target_latency"])
    batch, backend = int(record["batch"]), str(record["backend"])
    dtype, size = str(record["dtype"]), req.loaded.data_config["input_size"]

    def fraction(p: PrunePlan) -> float:
        dense = copy.deepcopy(req.loaded.model).eval()
        pruned = apply_plan(copy.deepcopy(req.loaded.model), p).eval()
        return latency.measured_fraction(dense, pruned, size, batch, backend=backend, dtype=dtype)

    rounds: list[dict[str, float]] = []
    best = (math.inf, plan, cost)
    for i in range(LATENCY_ROUNDS):
        measured = fraction(plan)
        predicted = cost(plan)
        rounds.append({"predicted": round(predicted, 4), "measured": round(measured, 4)})
        miss = abs(measured / target - 1)
        if miss < best[0]:
            best = (miss, plan, cost)
        if miss <= LATENCY_TOL or i == LATENCY_ROUNDS - 1:
            break
        cost = _scaled(cost, measured / max(predicted, 1e-9))
        try:
            plan = method.fn(
                PruneRequest(req.loaded, params, req.batches, req.seed, req.micro_batch, cost),
                callbacks=callbacks,
                cancel=cancel,
            )
        except StudioError:  # the corrected model says the target is out of reach: keep the best so far
            break
    record["rounds"] = rounds
    return best[1], best[2]


def all_options() -> dict[str, Option]:
    """Every option of every registered method by name (same name, same type: one CLI flag)."""
    out: dict[str, Option] = {o.name: o for o in COMMON_OPTIONS}
    for name in load_methods():
        for o in METHODS.get(name).accepted:
            if o.name in out and out[o.name].type is not o.type:
                raise StudioError(
                    f"Option '{o.name}' of method '{name}' clashes with another method's option of "
                    f"type {out[o.name].type.__name__}; rename it."
                )
            out.setdefault(o.name, o)
    return out
