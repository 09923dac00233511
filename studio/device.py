"""Device choice: CUDA when present, else CPU, overridable everywhere with ``--device``."""

from __future__ import annotations

import torch

from .errors import StudioError


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks ``cuda`` when available, else ``cpu``; explicit names are checked."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise StudioError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StudioError(f"Device '{name}' was asked for but no CUDA GPU is visible. Use --device cpu.")
    return dev


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{dev.index or 0} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"
