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

    with pytest.raises(SystemExit):  # the command line refuses it while parsing (tests/test_cli_numbers.py)
        build_parser().parse_args(["info", "--timm-kwargs", text])
    args = build_parser().parse_args(["info"])
    args.timm_kwargs = text  # a namespace built by a caller: model_spec still refuses it
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


# --------------------------------------------------------------------------------------------------- plans
def _plan_dict() -> dict:
    from studio.plan import BaseArch, BlockPlan, PrunePlan

    base = BaseArch(
        arch="vit_tiny_patch16_224",
        kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5),
        depth=3,
        embed_dim=48,
        num_heads=(3, 3, 3),
        head_dim=16,
        mlp_hidden=(192, 192, 192),
        num_classes=5,
    )
    plan = PrunePlan(
        base=base,
        blocks=(BlockPlan(0, heads=(0, 2), mlp=tuple(range(96))), BlockPlan(1), BlockPlan(2, attn_in=(0, 1))),
        embed=tuple(range(40)),
        params={"ratio": 0.5},
        summary={"params_before": 10, "params_after": 5},
    )
    return plan.to_dict()


def test_plan_every_field_to_dict_writes_is_accepted():
    import json

    from studio.plan import PrunePlan

    d = _plan_dict()
    assert PrunePlan.from_dict(json.loads(json.dumps(d))).to_dict() == d
    # optional fields may still be left out, as older hand-written plans do
    minimal = {
        k: v for k, v in d.items() if k not in ("method", "params", "scale_policy", "summary", "embed")
    }
    minimal["base"] = {k: v for k, v in d["base"].items() if k not in ("kwargs", "num_prefix_tokens")}
    assert PrunePlan.from_dict(minimal).blocks[0].heads == (0, 2)


def _edit(path: str, value, *, drop: bool = False) -> dict:
    d = _plan_dict()
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node["blocks"][int(p[7:-1])] if p.startswith("blocks[") else node[p]
    if drop:
        node.pop(last)
    else:
        node[last] = value
    return d


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        # misspelt or unknown fields, which used to be ignored (the block silently stayed dense)
        (
            "blocks[0].head",
            [0],
            r"'blocks\[0\]\.head' is unknown; did you mean 'heads'\?.*index, heads, head_dims",
        ),
        ("blocks[1].mpl", [0, 1], r"'blocks\[1\]\.mpl' is unknown; did you mean 'mlp'\?"),
        (
            "blocks[2].attention",
            [0],
            r"'blocks\[2\]\.attention' is unknown.*valid fields of 'blocks\[2\]' are",
        ),
        ("embeds", [0, 1], r"'embeds' is unknown; did you mean 'embed'\?.*schema, version, base"),
        ("base.embed_dims", 48, r"'base\.embed_dims' is unknown; did you mean 'embed_dim'\?"),
        # booleans, floats and strings where integers belong
        ("blocks[1].index", True, r"needs an integer 'index' \(got True\)"),
        ("blocks[0].heads", [True, 2], r"'blocks\[0\]\.heads' must be a list of integers"),
        ("embed", [False, 1], r"'embed' must be a list of integers"),
        ("base.depth", True, r"'base\.depth' must be an integer, not True"),
        ("base.embed_dim", 48.7, r"'base\.embed_dim' must be an integer, not 48\.7"),
        ("base.head_dim", "16", r"'base\.head_dim' must be an integer"),
        ("base.num_heads", [3, True, 3], r"'base\.num_heads\[1\]' must be an integer"),
        ("version", True, r"'version' is True"),
        # sizes bounded before anything is allocated by them
        ("base.embed_dim", 1_000_000_000, r"'base\.embed_dim' = 1,000,000,000 is out of range 1\.\.65,536"),
        ("base.mlp_hidden", [192, 10**12, 192], r"'base\.mlp_hidden\[1\]' = .* is out of range"),
        ("base.num_heads", [3, 3], r"'base\.num_heads' has 2 entries but 'base\.depth' is 3"),
        ("base.depth", 0, r"'base\.depth' = 0 is out of range"),
        (
            "blocks[0].mlp",
            list(range(193)),
            r"'blocks\[0\]\.mlp' lists 193 indices but the layer has only 192",
        ),
        # other malformed parts
        ("base", [], r"'base' must be an object"),
        ("params", [1], r"'params' must be an object or null"),
        ("method", 3, r"'method' must be a string"),
    ],
)
def test_plan_refuses_unknown_fields_bools_and_oversized_bases(path, value, message):
    from studio.plan import PrunePlan

    with pytest.raises(StudioError, match=message):
        PrunePlan.from_dict(_edit(path, value))


def test_plan_refuses_missing_base_field_and_too_many_blocks():
    from studio.plan import PrunePlan

    with pytest.raises(StudioError, match=r"'base' is incomplete: it needs 'head_dim'"):
        PrunePlan.from_dict(_edit("base.head_dim", None, drop=True))
    d = _plan_dict()
    d["blocks"] = [{"index": i} for i in range(5)]
    with pytest.raises(StudioError, match=r"'blocks' lists 5 blocks but the base has only 3"):
        PrunePlan.from_dict(d)
    with pytest.raises(StudioError, match="must be an object with an integer 'index'"):
        PrunePlan.from_dict({**_plan_dict(), "blocks": [3]})


def test_plan_with_a_huge_base_is_refused_at_once():
    import time

    from studio.plan import BaseArch, PrunePlan

    d = _edit("base.embed_dim", 1_000_000_000)
    d["embed"] = None
    t = time.perf_counter()
    with pytest.raises(StudioError, match="out of range"):
        PrunePlan.from_dict(d)
    # the same base built in code is refused by validate() before it sizes anything by embed_dim
    base = BaseArch("vit_tiny_patch16_224", {}, 1, 10**9, (3,), 16, (192,), 5)
    with pytest.raises(StudioError, match=r"'base\.embed_dim' = 1,000,000,000 is out of range"):
        PrunePlan.dense(base).validate()
    assert time.perf_counter() - t < 1.0


def test_every_preprocessing_field_can_be_set_for_any_source(capsys):
    """Issue 13: a bare checkpoint and its export must be evaluable the same way, so crop and interpolation are
    overridable like mean/std, and the override is what the evaluation uses."""
    import json

    from studio.cli import main

    assert main(["eval", "--json", "--device", "cpu"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (
        main(["eval", "--json", "--device", "cpu", "--crop-pct", "0.9", "--interpolation", "bilinear"]) == 0
    )
    cropped = json.loads(capsys.readouterr().out)
    assert cropped["n"] == plain["n"] and cropped["top1"] != plain["top1"]


def test_img_size_for_a_built_model_is_refused_not_ignored():
    from studio.load import load_model
    from studio.models import ModelSpec

    with pytest.raises(StudioError, match="--img-size applies to checkpoint files only"):
        load_model(ModelSpec("demo", img_size=64, device="cpu"))
    assert load_model(ModelSpec("demo", img_size=32, device="cpu")).data_config["input_size"] == [3, 32, 32]


def test_integer_weights_are_refused_instead_of_cast(tmp_path):
    import torch
    from safetensors.torch import save_file

    from studio.load import load_model
    from studio.models import ModelSpec, create_vit

    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    sd = {k: v.contiguous() for k, v in create_vit("vit_tiny_patch16_224", **kw).state_dict().items()}
    sd["blocks.0.attn.qkv.weight"] = (sd["blocks.0.attn.qkv.weight"] * 100).to(torch.int32)
    save_file(sd, str(tmp_path / "q.safetensors"))
    spec = ModelSpec(str(tmp_path / "q.safetensors"), arch="vit_tiny_patch16_224", device="cpu", kwargs=kw)
    with pytest.raises(StudioError, match=r"non-float weights .*blocks\.0\.attn\.qkv\.weight"):
        load_model(spec)
