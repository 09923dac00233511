"""Inputs that used to give a silently wrong result (issue #13) and are now read correctly or refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from studio.data import DataSpec, load_split
from studio.errors import StudioError


# ------------------------------------------------------------------------------------- high-bit-depth images
def _gradient16() -> np.ndarray:
    """A 16-bit horizontal gradient over the full 0..65535 range, with low bits that must not matter."""
    rng = np.random.default_rng(0)
    g8 = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (16, 1))  # 16x64, 8-bit levels
    return g8 * 257 + rng.integers(0, 129, size=g8.shape, dtype=np.uint16)


def _folder_of(tmp_path, images: dict[str, Image.Image]) -> DataSpec:
    for name, im in images.items():
        d = tmp_path / "train" / "c0"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / name)
    return DataSpec("imagefolder", str(tmp_path))


def _pixels(spec: DataSpec) -> dict[str, np.ndarray]:
    ds = load_split(spec, "train")
    return {p.split("/")[-1]: np.asarray(ds.image(i)).astype(int) for i, (p, _) in enumerate(ds.items)}


def test_16_bit_png_scales_to_8_bit_instead_of_saturating(tmp_path):
    g16 = _gradient16()
    g8 = np.rint(g16 / 257).astype(np.uint8)
    spec = _folder_of(tmp_path, {"a16.png": Image.fromarray(g16), "b8.png": Image.fromarray(g8)})
    assert Image.open(tmp_path / "train/c0/a16.png").mode == "I;16"
    px = _pixels(spec)
    assert px["a16.png"].shape == (16, 64, 3)
    assert np.abs(px["a16.png"] - px["b8.png"]).max() <= 1
    assert px["a16.png"].min() == 0 and 250 <= px["a16.png"].max() <= 255
    assert len(np.unique(px["a16.png"])) >= 60  # a gradient, not all-white
    # the tensor the loader yields without a transform holds the same values
    x, _ = load_split(spec, "train")[0]
    assert x.shape == (3, 16, 64) and int(x.max()) <= 255 and len(x.unique()) >= 60


def test_32_bit_int_and_float_images_scale_to_8_bit(tmp_path):
    g16 = _gradient16()
    g8 = np.rint(g16 / 257).astype(int)
    spec = _folder_of(
        tmp_path,
        {
            "i32.tiff": Image.fromarray(g16.astype(np.int32)),  # mode I holding 16-bit values
            "f01.tiff": Image.fromarray((g16 / 65535).astype(np.float32)),  # mode F in 0..1
        },
    )
    assert Image.open(tmp_path / "train/c0/i32.tiff").mode == "I"
    assert Image.open(tmp_path / "train/c0/f01.tiff").mode == "F"
    px = _pixels(spec)
    for name in ("i32.tiff", "f01.tiff"):
        assert np.abs(px[name][..., 0] - g8).max() <= 1, name


def test_16_bit_in_memory_array_scales(tmp_path):
    from studio.data import ImageList

    g16 = _gradient16()
    img = np.asarray(ImageList([(g16, 0)], ["0"]).image(0)).astype(int)
    assert np.abs(img[..., 0] - np.rint(g16 / 257)).max() <= 1


# ----------------------------------------------------------------------------------------- VTAB list files
def test_vtab_list_with_byte_order_mark(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"images/{i}.png")
    text = "images/0.png 0\nimages/1.png 1\n"
    (tmp_path / "train800.txt").write_text("\ufeff" + text, encoding="utf-8")
    ds = load_split(DataSpec("vtab", str(tmp_path)), "train")
    assert [y for _, y in ds.items] == [0, 1]
    assert ds.items[0][0] == str(tmp_path / "images/0.png")


# ----------------------------------------------------------------------------------------------- --limit
@pytest.mark.parametrize("limit", [-200, 0, True, 2.5])
def test_data_limit_must_be_positive(limit):
    with pytest.raises(StudioError, match=r"limit must be a positive whole number.*--limit N"):
        DataSpec("demo", limit=limit)
    with pytest.raises(StudioError, match="limit must be a positive"):
        DataSpec.parse("demo", limit=limit)
    with pytest.raises(StudioError, match="limit must be a positive"):
        DataSpec.from_dict({"kind": "demo", "limit": limit})


def test_data_limit_positive_still_subsets():
    assert len(load_split(DataSpec("demo", limit=7), "test")) == 7
    assert DataSpec.from_dict(DataSpec("demo", limit=7).to_dict()).limit == 7
    assert DataSpec("demo").limit is None
