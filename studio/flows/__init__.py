"""Flows: one per kind of work, each a frozen spec (``spec.json``) and a ``run`` function.

A piece of work has exactly one form from the page to the job: a frozen spec dataclass that round-trips through
``spec.json`` (``to_dict``/``from_dict``, ``kind`` naming its flow). Pages and CLI commands build the spec,
``spec.validate()`` refuses a bad combination *before* anything starts, and then either

- run it inline: :func:`start` writes the run folder and calls the flow (seconds of work on the Prune page), or
- submit it as a job: :func:`studio.jobs.submit` writes the run folder and starts ``python -m studio run RUN``
  (the same line under ``torchrun``), which calls :func:`run_folder` -- the flow reads its ``spec.json``.

Adding a kind of work is one module here that calls ``FLOWS.add``; :func:`load_flows` imports every module of
this package, so the CLI's ``run`` verb, the jobs and the tests parametrised over :data:`FLOWS` see it at once.
Every flow ends in the shared tail (:mod:`studio.flows.stages`) and writes ``results.json`` in its one shape.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import secrets
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .. import memory
from ..errors import StudioError
from ..events import Callback, CancelToken
from ..models import LoadedModel
from ..registry import Registry
from ..runs import RunDir, RunLogger, new_run_id
from .stages import RunResult


@runtime_checkable
class Spec(Protocol):
    """What every spec offers: its flow's kind, a JSON form, and validation before any work starts."""

    @property
    def kind(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...

    def validate(self) -> None: ...


class FlowFn(Protocol):
    """``run(spec, ...)``; ``spec`` is the flow's own spec class (typed ``Any`` here only because a parameter
    of a callable protocol cannot be narrowed per flow)."""

    def __call__(
        self,
        spec: Any,
        *,
        run: RunDir | None,
        loaded: LoadedModel | None = None,
        callbacks: Sequence[Callback] = (),
        cancel: CancelToken | None = None,
        resume: bool = False,
    ) -> RunResult: ...


class SpecType(Protocol):
    """A spec class: builds its spec from the ``spec.json`` dict."""

    def from_dict(self, d: Mapping[str, Any]) -> Any: ...


@dataclass(frozen=True)
class Flow:
    """A registered kind of work.

    Attributes:
        kind: the ``kind`` in ``spec.json`` (``prune``, ``p3b``, ``splora``, ``sls``, ``retrain``, ``importance``,
            ``benchmark``).
        spec_type: the frozen spec dataclass (``from_dict`` reads ``spec.json``).
        run: ``run(spec, *, run, loaded, callbacks, cancel, resume) -> RunResult``.
        summary: one line for ``python -m studio run --help`` and the Runs page.
        trains: whether it trains (checkpoints, resumable, worth a background job).
    """

    kind: str
    spec_type: SpecType
    run: FlowFn
    summary: str
    trains: bool = False


FLOWS: Registry[Flow] = Registry("flow")


def load_flows() -> Registry[Flow]:
    """Import every module of this package (each registers its flow) and return :data:`FLOWS`."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "stages":
            importlib.import_module(f"{__name__}.{info.name}")
    return FLOWS


def spec_from_dict(d: Mapping[str, Any]) -> Spec:
    """The spec a ``spec.json`` holds, by its ``kind``; refuses unknown kinds listing the valid ones."""
    if not isinstance(d, Mapping) or "kind" not in d:
        raise StudioError("This spec.json has no 'kind': it was not written by the studio (or is damaged).")
    spec: Spec = load_flows().get(str(d["kind"])).spec_type.from_dict(d)
    return spec


def read_spec(run: RunDir | str | Path) -> Spec:
    """The spec of a run folder."""
    rd = run if isinstance(run, RunDir) else RunDir(Path(run))
    if not rd.spec_file.exists():
        raise StudioError(f"{rd.path} has no spec.json: give a run folder the studio wrote.")
    return spec_from_dict(rd.spec())


def new_run_dir(root: str | Path, spec: Spec, label: str | None = None) -> Path:
    """A fresh run folder under ``root`` named ``<time>-<label>-<hex>`` (default label: the kind, and the method
    where it says more); the random suffix keeps two sessions in the same second apart."""
    method = getattr(spec, "method", None)
    label = label or (spec.kind if method in (None, spec.kind) else f"{spec.kind}-{method}")
    return Path(root) / f"{new_run_id(label)}-{secrets.token_hex(2)}"


def create_run(spec: Spec, path: str | Path) -> RunDir:
    """Validate ``spec`` and write it as ``spec.json`` of a new run folder (refused if the folder has a run)."""
    spec.validate()
    return RunDir.create(path, spec.to_dict())


def run_folder(
    run: RunDir | str | Path,
    *,
    resume: bool = False,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    spec: Spec | None = None,
) -> RunResult:
    """Run the flow of a run folder's ``spec.json``, recording its status (``python -m studio run RUN``).

    Args:
        resume: continue from the run's checkpoints (a training flow); a cancel left over from the stopped
            attempt is cleared first, so the resumed attempt does not stop itself.
        loaded: an already loaded model (the studio's cached one); never mutated.
        spec: the spec to run in place of ``spec.json`` (same kind: e.g. with this attempt's device).
    """
    rd = run if isinstance(run, RunDir) else RunDir(Path(run))
    spec = spec or read_spec(rd)
    spec.validate()
    flow = load_flows().get(spec.kind)
    token = cancel or CancelToken(rd.cancel_file)
    if os.environ.get("RANK", "0") != "0":  # another rank of a torchrun group: rank 0 keeps the books
        return flow.run(spec, run=rd, loaded=loaded, callbacks=callbacks, cancel=token, resume=resume)
    if resume:
        rd.cancel_file.unlink(missing_ok=True)
    with rd.tracking(resumed=resume):
        cbs = [*callbacks, RunLogger(rd)]
        memory.reset_peak(getattr(loaded, "device", None))  # results.json reports this attempt's peak
        return flow.run(spec, run=rd, loaded=loaded, callbacks=cbs, cancel=token, resume=resume)


def start(
    spec: Spec,
    *,
    root: str | Path,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    label: str | None = None,
) -> tuple[RunDir, RunResult]:
    """Run ``spec`` inline in a new run folder under ``root`` (short work; long work goes through jobs)."""
    rd = create_run(spec, new_run_dir(root, spec, label))
    return rd, run_folder(rd, loaded=loaded, callbacks=callbacks, cancel=cancel, spec=spec)


def on_device(spec: Spec, device: str) -> Spec:
    """The same spec with this attempt's device for its models (a run may be resumed elsewhere; ``spec.json``
    keeps the device it was started with). ``auto`` or empty leaves it as it is."""
    if device in ("", "auto") or not dataclasses.is_dataclass(spec):
        return spec
    changes = {
        n: m.with_(device=device) for n in ("model", "teacher") if (m := getattr(spec, n, None)) is not None
    }
    return dataclasses.replace(spec, **changes)  # type: ignore[type-var]


def sigterm_cancels(token: CancelToken) -> None:
    """Make SIGTERM (``jobs cancel --force``, torchrun forwarding a stop) the same clean stop as ``CANCEL``."""
    signal.signal(signal.SIGTERM, lambda *_: token.set())
