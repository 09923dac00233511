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


# ---------------------------------------------------------------------------------------- argparse types
@pytest.mark.parametrize(
    ("fn", "good", "bad"),
    [
        (
            "positive_int",
            {"1": 1, "224": 224, "1e3": 1000, "2.0": 2},
            ["0", "-200", "1e20", "1.5", "nan", "x"],
        ),
        ("nonnegative_int", {"0": 0, "7": 7}, ["-1", "1e20", "inf", "0.5", ""]),
        ("positive_float", {"0.5": 0.5, "1e-4": 1e-4}, ["0", "-1", "nan", "inf", "-inf", "x"]),
        ("finite_float", {"-2.5": -2.5, "0": 0.0}, ["nan", "inf", "-inf", "x"]),
        ("nonnegative_float", {"0": 0.0, "3": 3.0}, ["-0.1", "nan", "inf", "x"]),
    ],
)
def test_argtypes_refuse_impossible_numbers(fn, good, bad):
    import argparse

    from studio import argtypes

    f = getattr(argtypes, fn)
    for text, value in good.items():
        assert f(text) == value and type(f(text)) is type(value), text
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError) as e:
            f(text)
        assert "\n" not in str(e.value) and repr(text) in str(e.value), text


def _cli_error(capsys, *argv: str) -> str:
    from studio.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("eval", "--limit", "-200"), "argument --limit: must be a positive integer, not '-200'"),
        (("eval", "--limit", "0"), "argument --limit: must be a positive integer"),
        (("eval", "--img-size", "0"), "argument --img-size: must be a positive integer"),
        (("info", "--num-classes", "1e20"), "argument --num-classes: '1e20' is too large"),
        (("info", "--std", "0.2", "0", "0.2"), "argument --std: must be a number > 0"),
        (("info", "--mean", "nan", "0", "0"), "argument --mean: must be a finite number"),
    ],
)
def test_cli_refuses_impossible_numbers_in_one_line(capsys, argv, needle):
    assert needle in _cli_error(capsys, *argv)


def test_cli_accepts_valid_numbers():
    from studio.cli import build_parser
    from studio.commands import data_spec, model_spec

    args = build_parser().parse_args(
        [
            "eval",
            "--limit",
            "64",
            "--img-size",
            "32",
            "--num-classes",
            "5",
            "--timm-kwargs",
            '{"patch_size": 8}',
        ]
    )
    assert data_spec(args).limit == 64
    spec = model_spec(args)
    assert (spec.img_size, spec.num_classes, spec.kwargs) == (32, 5, {"patch_size": 8})


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"patch_size=8"', "null"])
def test_timm_kwargs_must_be_a_json_object(text):
    from studio.cli import build_parser
    from studio.commands import model_spec

    args = build_parser().parse_args(["info", "--timm-kwargs", text])
    with pytest.raises(StudioError, match=r"--timm-kwargs must be a JSON object"):
        model_spec(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--timm-kwargs", '{"patch_size": 8}', "--img-size", "39"],
            r"39 is not a multiple of the patch size 8.*last 7 pixels.*use 40 or 32",
        ),
        (["--arch", "vit_small_patch16_224", "--img-size", "200"], r"patch size 16.*use 208 or 192"),
        (["--timm-kwargs", '{"patch_size": [14, 14]}', "--img-size", "10"], r"patch size 14.*use 14\.$"),
    ],
)
def test_img_size_must_tile_the_patch_grid(argv, message):
    from studio.cli import build_parser
    from studio.commands import model_spec

    with pytest.raises(StudioError, match=message):
        model_spec(build_parser().parse_args(["info", *argv]))
    # the patch size given in --timm-kwargs wins over the one in the arch name; dynamic padding tiles any size
    ok = build_parser().parse_args(
        ["info", "--arch", "vit_tiny_patch16_224", "--timm-kwargs", '{"patch_size": 8}', "--img-size", "40"]
    )
    assert model_spec(ok).img_size == 40
    padded = build_parser().parse_args(["info", "--timm-kwargs", '{"dynamic_img_pad": true}', *argv[-2:]])
    assert model_spec(padded).kwargs == {"dynamic_img_pad": True}
