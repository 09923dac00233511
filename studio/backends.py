"""Deployment backends: the runtimes a model is timed on (PyTorch eager, ``torch.compile``, ONNX Runtime).

Users deploy through more than PyTorch eager, and a pruned model's speed-up differs by runtime (fused kernels,
graph optimisations, per-op overheads), so every speed figure of the studio names the backend it was measured
on. A :class:`Backend` prepares a model once for a fixed input and returns a zero-argument call that runs one
pass; :func:`studio.bench.measure_throughput` times that call with the one measuring protocol (warm-up, device
synchronisation, median of repeats). A new runtime is one :data:`BACKENDS` entry; the Benchmark page, the
``bench`` command and the latency model offer it from the registry.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import StudioError
from .export import export_onnx
from .registry import Registry

Prepare = Callable[[torch.nn.Module, torch.Tensor, "torch.dtype | None"], Callable[[], Any]]


@dataclass(frozen=True)
class Backend:
    """A deployment runtime.

    Attributes:
        prepare: ``prepare(model, x, dtype)`` readies the model once for input ``x`` (autocast ``dtype``, None for
            float32) and returns a zero-argument call running one pass.
        dtypes: the dtype names it can time (ONNX Runtime runs the float32 export only).
    """

    name: str
    summary: str
    prepare: Prepare
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")

    def supports(self, dtype: str) -> bool:
        return dtype in self.dtypes


BACKENDS: Registry[Backend] = Registry("backend")


def _autocast(x: torch.Tensor, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _eager(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode(), _autocast(x, dtype):
            return model(x)

    return run


def _compiled(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
    # a copy: compiling must not touch the studio's shared cached model
    try:
        fn = torch.compile(copy.deepcopy(model).eval(), dynamic=False)
        with torch.inference_mode(), _autocast(x, dtype):
            fn(x)  # compiles now, so a machine without a working compiler fails here, clearly
    except Exception as e:  # torch.compile raises many types (missing compiler, inductor errors)
        raise StudioError(
            f"torch.compile does not work on this machine ({type(e).__name__}: {str(e)[:120]}); use the "
            "eager or onnxruntime backend."
        ) from None

    def run() -> Any:
        with torch.inference_mode(), _autocast(x, dtype):
            return fn(x)

    return run


def _onnxruntime(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
    import onnxruntime as ort  # optional at import time: only this backend needs it

    folder = Path(tempfile.mkdtemp(prefix="studio-ort-"))
    path = folder / "model.onnx"
    export_onnx(model, path, list(x.shape[1:]), check=False)
    providers = ["CPUExecutionProvider"]
    if x.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the studio's thread policy, not ORT's own
    session = ort.InferenceSession(str(path), opts, providers=providers)
    name = session.get_inputs()[0].name
    feed = {name: x.detach().cpu().numpy()}
    with contextlib.suppress(OSError):
        path.unlink()
        folder.rmdir()

    def run() -> Any:
        return session.run(None, feed)

    return run


BACKENDS.add("eager", Backend("eager", "PyTorch eager, inference_mode", _eager))
BACKENDS.add("compile", Backend("compile", "torch.compile (inductor)", _compiled))
BACKENDS.add(
    "onnxruntime", Backend("onnxruntime", "ONNX Runtime (CPU / CUDA provider)", _onnxruntime, ("float32",))
)
