"""Datasets: the demo split, ImageFolder and VTAB-1k layouts, and their bad-input messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.data import DataSpec, check_labels, load_split, prepare
from studio.demo import DEMO_DATA_CONFIG
from studio.errors import StudioError


def _img(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path)


def test_demo_split_is_fixed_and_disjoint():
    parts = {s: load_split(DataSpec(), s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1257, 270, 270]
    keys = {s: {p[0].tobytes() + bytes([p[1]]) for p in parts[s].items} for s in parts}
    assert not (keys["train"] & keys["test"])  # digits has a few duplicate images; this split has none across
    again = load_split(DataSpec(), "test")
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(parts["test"].items, again.items))


def test_prepare_applies_model_transform():
    ds = prepare(DataSpec(), "val", DEMO_DATA_CONFIG, 10, class_names=None)
    x, y = ds[0]
    assert tuple(x.shape) == (3, 32, 32) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert 0 <= int(y) < 10


def test_imagefolder(tmp_path):
    for split in ("train", "val"):
        for c, v in (("cat", 10), ("dog", 200)):
            _img(tmp_path / split / c / "a.png", v)
    ds = load_split(DataSpec.parse(f"imagefolder:{tmp_path}"), "train", DEMO_DATA_CONFIG)
    assert ds.class_names == ["cat", "dog"] and len(ds) == 2 and ds[1][1] == 1
    assert len(load_split(DataSpec.parse(f"imagefolder:{tmp_path}"), "test")) == 2  # falls back to val/


def test_imagefolder_empty_class_folder(tmp_path):
    _img(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(StudioError, match=r"dog has no images"):
        load_split(DataSpec.parse(f"imagefolder:{tmp_path}"), "train")


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path):
    _img(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "train" / "cat" / "b.png").write_bytes(b"not a png")
    ds = load_split(DataSpec.parse(f"imagefolder:{tmp_path}"), "train", DEMO_DATA_CONFIG)
    with pytest.raises(StudioError, match=r"b\.png cannot be decoded.*--skip-bad-files"):
        ds[1]
    ok = load_split(DataSpec.parse(f"imagefolder:{tmp_path}", skip_bad_files=True), "train", DEMO_DATA_CONFIG)
    assert len(ok) == 1 and "b.png" in ok.skipped[0]


def test_vtab_lists(tmp_path):
    for i in range(3):
        _img(tmp_path / "images" / f"{i}.png", 50 * i)
    (tmp_path / "train800.txt").write_text("images/0.png 0\nimages/1.png 1\n")
    (tmp_path / "val200.txt").write_text("images/2.png 2\n")
    (tmp_path / "test.txt").write_text("images/2.png 2\n")
    ds = load_split(DataSpec.parse(f"vtab:{tmp_path}"), "train", DEMO_DATA_CONFIG)
    assert len(ds) == 2 and [y for _, y in ds.items] == [0, 1]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("images/9.png 0", r"train800\.txt line 2: image images/9\.png does not exist"),
        ("images/0.png cat", r"line 2: label 'cat' is not an integer"),
        ("images/0.png -1", r"line 2: label -1 is negative"),
        ("images/0.png", r"line 2: expected 'relative/path label'"),
    ],
)
def test_vtab_bad_lines_name_file_and_line(tmp_path, line, needle):
    _img(tmp_path / "images" / "0.png")
    (tmp_path / "train800.txt").write_text(f"images/0.png 0\n{line}\n")
    with pytest.raises(StudioError, match=needle):
        load_split(DataSpec.parse(f"vtab:{tmp_path}"), "train")


def test_label_out_of_range_for_model(tmp_path):
    _img(tmp_path / "images" / "0.png")
    (tmp_path / "train800.txt").write_text("images/0.png 12\n")
    ds = load_split(DataSpec.parse(f"vtab:{tmp_path}"), "train")
    with pytest.raises(
        StudioError, match=r"train800\.txt line 1.*label 12 is out of range for a 10-class model"
    ):
        check_labels(ds, 10, class_names=None)


def test_unknown_dataset_kind_lists_valid_ones():
    with pytest.raises(StudioError, match="Valid dataset kinds: demo, imagefolder, vtab"):
        DataSpec.parse("coco:/x")


def test_only_splits_within_the_byte_budget_are_kept_in_memory(monkeypatch):
    import studio.data as data

    kept = prepare(DataSpec(), "val", DEMO_DATA_CONFIG, 10, class_names=None)
    assert isinstance(kept, data.TensorData)
    # 270 images of 3x32x32 float32 are 3.3 MB: over a 1 MB budget the split is decoded per pass instead
    monkeypatch.setattr(data, "IN_MEMORY_BYTES", 1 << 20)
    lazy = prepare(DataSpec(), "val", DEMO_DATA_CONFIG, 10, class_names=None)
    assert not isinstance(lazy, data.TensorData) and len(lazy) == len(kept)
    assert torch.equal(lazy[5][0], kept[5][0]) and int(lazy[5][1]) == int(kept[5][1])
    asked = prepare(DataSpec(), "val", DEMO_DATA_CONFIG, 10, class_names=None, keep_in_memory=False)
    assert not isinstance(asked, data.TensorData)


def test_calibration_decodes_only_the_batches_it_draws(demo_loaded, monkeypatch):
    import studio.data as data
    from studio.analysis.criteria import batch_sizes, calibration_batches, largest_batch

    decoded = []
    real = data.ImageList.__getitem__
    monkeypatch.setattr(data.ImageList, "__getitem__", lambda self, i: decoded.append(i) or real(self, i))
    batches = calibration_batches(demo_loaded, DataSpec(), "train", 2, 16)
    assert decoded == [] and largest_batch(batches) == 16  # sizing a micro-batch decodes nothing
    drawn = list(batches)
    assert len(decoded) == 32 and [len(y) for _, y in drawn] == [16, 16]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(drawn, batches))  # every pass draws the same images
    # sizes are known without drawing, down to the short last batch of a split smaller than n x batch
    whole = calibration_batches(demo_loaded, DataSpec(), "val", 3, 100)
    decoded.clear()
    assert batch_sizes(whole) == [100, 100, 70] and decoded == []
    assert batch_sizes(whole) == [len(y) for _, y in whole]


def test_a_data_folder_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    """A spec stored in a run (resumed from another directory) or used as a cache key names one folder."""
    monkeypatch.chdir(tmp_path)
    spec = DataSpec.parse("imagefolder:data")
    assert spec.path == str(tmp_path / "data") and spec == DataSpec.parse(f"imagefolder:{tmp_path / 'data'}")
    assert DataSpec.from_dict(spec.to_dict()) == spec and DataSpec().path is None
