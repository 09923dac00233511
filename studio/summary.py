"""What a loaded model is and how well it does: architecture table, params, MACs, accuracy, speed.

Shared by ``python -m studio info`` and the studio's Model page, so both show the same numbers. MACs are the
dispatcher counts of :func:`studio.bench.count_macs` (attention matmuls separate from linear layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .bench import count_macs, count_params, measure_throughput
from .data import DataSpec, check_labels, load_split, prepare
from .device import describe_device
from .errors import StudioError
from .evaluate import evaluate
from .events import Callback, CancelToken, progress
from .families import mlp_hidden
from .models import LoadedModel

CHECK_DECODE_ALL = 2000  # splits up to this size are fully decoded when a dataset is chosen
CHECK_DECODE_SAMPLE = 64


def model_summary(loaded: LoadedModel) -> dict[str, Any]:
    """Architecture table, params and MACs of a loaded model (``info`` command and the Model page)."""
    m = loaded.model
    macs = count_macs(m, loaded.data_config["input_size"])
    blocks = [
        {
            "block": i,
            "heads": int(b.attn.num_heads) if hasattr(b, "attn") else None,
            "head_dim": int(b.attn.head_dim) if hasattr(b, "attn") else None,
            "mlp": mlp_hidden(b.mlp) if hasattr(b, "mlp") else None,
            "width": int(b.attn.qkv.in_features) if hasattr(b, "attn") else None,
            "params": sum(p.numel() for p in b.parameters()),
        }
        for i, b in enumerate(m.blocks)
    ]
    return {
        "source": loaded.source,
        "arch": loaded.base.arch,
        "depth": len(blocks),
        "embed_dim": int(m.embed_dim),
        "num_classes": int(m.num_classes),
        "input_size": loaded.data_config["input_size"],
        "params": count_params(m),
        "macs": macs["total"],
        "macs_attention": macs["attention"],
        "macs_linear": macs["linear"],
        "macs_conv": macs["conv"],
        "pruned": loaded.plan is not None and loaded.plan.method != "dense",
        "device": describe_device(loaded.device),
        "blocks": blocks,
        "data_config": loaded.data_config,
        "metrics": loaded.metrics,
    }


def check_data(
    loaded: LoadedModel, spec: DataSpec, splits: Sequence[str] = ("train", "test")
) -> dict[str, int]:
    """Refuse a dataset the model cannot use, before anything long runs on it.

    Lists every split (missing folders/files, bad list lines), checks labels against the classifier and decodes
    the images (all of them for small splits, a seeded sample otherwise), so empty class folders, corrupt or
    oversized images and out-of-range labels surface as :class:`StudioError` naming the file at fault.
    Returns the number of samples per split.
    """
    sizes: dict[str, int] = {}
    for split in splits:
        ds = load_split(spec, split)
        if len(ds) == 0:
            raise StudioError(f"Split '{split}' of {spec} has no images.")
        check_labels(ds, loaded.base.num_classes, split, class_names=loaded.known_class_names)
        idx = np.arange(len(ds))
        if len(ds) > CHECK_DECODE_ALL:
            idx = np.random.default_rng(spec.seed).choice(len(ds), CHECK_DECODE_SAMPLE, replace=False)
        for i in idx:
            ds.image(int(i))
        sizes[split] = len(ds)
    return sizes


def evaluate_split(
    loaded: LoadedModel,
    spec: DataSpec,
    split: str = "test",
    *,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Top-1, loss and per-class accuracy of the model on one split (plain dict: cacheable, JSON-able)."""

    ds = prepare(
        spec, split, loaded.data_config, loaded.base.num_classes, class_names=loaded.known_class_names
    )
    ev = evaluate(loaded.model, ds, num_classes=loaded.base.num_classes, callbacks=callbacks, cancel=cancel)
    names = loaded.class_names or [str(i) for i in range(len(ev.per_class))]
    return {
        "data": str(spec),
        "split": split,
        "top1": ev.top1,
        "loss": ev.loss,
        "n": ev.n,
        "per_class": dict(zip(names, ev.per_class)),
    }


def measure_speed(
    loaded: LoadedModel,
    batch_sizes: Sequence[int] = (1, 64),
    *,
    warmup: int = 5,
    repeats: int = 20,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> list[dict[str, Any]]:
    """Measured float32 throughput and latency at each batch size (see :func:`studio.bench.measure_throughput`)."""
    rows = []
    for n, bs in enumerate(batch_sizes):
        r = measure_throughput(
            loaded.model,
            loaded.data_config["input_size"],
            batch_size=int(bs),
            warmup=warmup,
            repeats=repeats,
            callbacks=callbacks,
            cancel=cancel,
        )
        rows.append(r.to_dict())
        progress(callbacks, "batch sizes", n + 1, len(batch_sizes))
    return rows
