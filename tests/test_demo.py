"""The demo build runs end to end (short) and writes loadable exports."""

from __future__ import annotations

from studio.demo import SHAPES, DemoBuildSpec, build_demo, shapes_dataset
from studio.load import load_model
from studio.models import ModelSpec


def test_shapes_dataset_is_seeded_and_balanced():
    a, b = shapes_dataset(400, seed=3), shapes_dataset(400, seed=3)
    assert (a.images == b.images).all() and a.images.shape == (400, 3, 32, 32)
    counts = a.labels.bincount(minlength=len(SHAPES))
    assert counts.min() > 20


def test_short_build_writes_both_models(tmp_path):
    metrics = build_demo(
        DemoBuildSpec(pretrain_images=256, pretrain_epochs=1, finetune_epochs=1, out=str(tmp_path))
    )
    assert 0 <= metrics["test_top1"] <= 1
    backbone = load_model(ModelSpec(str(tmp_path / "backbone"), device="cpu"))
    finetuned = load_model(ModelSpec(str(tmp_path / "finetuned"), device="cpu"))
    assert backbone.base.num_classes == 8 and finetuned.base.num_classes == 10
    assert finetuned.class_names == [str(i) for i in range(10)]
    assert finetuned.metrics["test_top1"] == metrics["test_top1"]
