"""The embedded demo: a 12-block ViT pre-trained on procedural shapes, then fine-tuned on scikit-learn's digits.

This gives the methods the story they assume: a backbone pre-trained on one image domain (kept as
``assets/demo/backbone``, the starting point of SLS-style PETL, P3B and SPLoRA) and a model fine-tuned from it on
another (``assets/demo/finetuned``, the default model of the studio). ``python -m studio demo build`` reproduces
both with the project's own training loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DataSpec, TensorData, in_memory, load_split
from .evaluate import evaluate
from .events import Callback, CancelToken, emit
from .export import export
from .models import DEMO_ARCH, DEMO_DIR, DEMO_KWARGS, create_vit, describe_base
from .train import TrainSpec, fit

DEMO_DATA_CONFIG: dict[str, Any] = {
    "input_size": [3, 32, 32],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
}
SHAPES = ("disc", "square", "triangle", "cross", "ring", "h-stripes", "v-stripes", "checker")


def shapes_dataset(n: int, *, seed: int = 0, size: int = 32) -> TensorData:
    """Procedural grey shapes and textures at random positions, scales, contrasts and noise (8 classes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((n, size, size), np.float32)
    labels = rng.integers(0, len(SHAPES), n)
    for i, k in enumerate(labels):
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.15, 0.35) * size
        dx, dy = xx - cx, yy - cy
        name = SHAPES[k]
        if name == "disc":
            m = dx**2 + dy**2 < r**2
        elif name == "square":
            m = (abs(dx) < r * 0.8) & (abs(dy) < r * 0.8)
        elif name == "triangle":
            m = (dy < r * 0.7) & (dy > -r) & (abs(dx) < (dy + r) * 0.6)
        elif name == "cross":
            m = ((abs(dx) < r * 0.25) & (abs(dy) < r)) | ((abs(dy) < r * 0.25) & (abs(dx) < r))
        elif name == "ring":
            d = np.sqrt(dx**2 + dy**2)
            m = (d < r) & (d > r * 0.6)
        else:
            period = rng.uniform(4, 8)
            phase = rng.uniform(0, period)
            box = (abs(dx) < r * 1.2) & (abs(dy) < r * 1.2)
            if name == "h-stripes":
                m = box & (((yy + phase) % period) < period / 2)
            elif name == "v-stripes":
                m = box & (((xx + phase) % period) < period / 2)
            else:
                m = box & ((((xx + phase) // (period / 2)) + ((yy + phase) // (period / 2))) % 2 == 0)
        fg, bg = rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.3)
        images[i] = np.where(m, fg, bg) + rng.normal(0, 0.05, (size, size))
    x = torch.from_numpy(np.clip(images, 0, 1)).unsqueeze(1).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    return TensorData(x, torch.from_numpy(labels.astype(np.int64)), SHAPES)


@dataclass(frozen=True)
class DemoBuildSpec:
    """How the demo is made; the defaults are the shipped assets' recipe."""

    pretrain_images: int = 6000
    pretrain_epochs: int = 8
    finetune_epochs: int = 30
    seed: int = 0
    out: str = str(DEMO_DIR)


def build_demo(
    spec: DemoBuildSpec = DemoBuildSpec(),
    *,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Pre-train on shapes, fine-tune on digits, export both; return their accuracies."""
    torch.manual_seed(spec.seed)
    out = Path(spec.out)
    kwargs = dict(DEMO_KWARGS, num_classes=len(SHAPES))
    model = create_vit(DEMO_ARCH, **kwargs)
    shapes_train = shapes_dataset(spec.pretrain_images, seed=spec.seed)
    shapes_val = shapes_dataset(max(200, spec.pretrain_images // 10), seed=spec.seed + 1)
    emit(callbacks, "log", message=f"pre-training on {len(shapes_train)} procedural shapes")
    fit(
        model,
        shapes_train,
        shapes_val,
        TrainSpec(epochs=spec.pretrain_epochs, lr=1e-3, seed=spec.seed),
        callbacks=callbacks,
        cancel=cancel,
    )
    shapes_acc = evaluate(model, shapes_val).top1
    export(
        model,
        describe_base(model, DEMO_ARCH, kwargs),
        out / "backbone",
        data_config=DEMO_DATA_CONFIG,
        class_names=list(SHAPES),
        metrics={"shapes_val_top1": shapes_acc},
        dtype=torch.float16,
        extra={"description": "demo backbone pre-trained on procedural shapes (8 classes)"},
        overwrite=True,  # `demo build` rebuilds the embedded demo: replacing it is what it was asked to do
    )

    emit(callbacks, "log", message="fine-tuning on scikit-learn digits")
    digits = {s: in_memory(load_split(DataSpec(), s, DEMO_DATA_CONFIG)) for s in ("train", "val", "test")}
    model.reset_classifier(10)
    fit(
        model,
        digits["train"],
        digits["val"],
        TrainSpec(epochs=spec.finetune_epochs, lr=1e-3, seed=spec.seed, label_smoothing=0.1),
        callbacks=callbacks,
        cancel=cancel,
    )
    val, test = evaluate(model, digits["val"]), evaluate(model, digits["test"])
    ft_kwargs = dict(DEMO_KWARGS, num_classes=10)
    metrics = {"val_top1": val.top1, "test_top1": test.top1, "shapes_val_top1": shapes_acc}
    export(
        model,
        describe_base(model, DEMO_ARCH, ft_kwargs),
        out / "finetuned",
        data_config=DEMO_DATA_CONFIG,
        class_names=[str(i) for i in range(10)],
        metrics=metrics,
        extra={
            "description": "demo ViT fine-tuned on scikit-learn digits from the shapes backbone",
            "recipe": {"pretrain": spec.__dict__, "finetune_lr": 1e-3, "label_smoothing": 0.1},
        },
        overwrite=True,
    )
    return metrics
