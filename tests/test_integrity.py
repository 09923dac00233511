"""Where a model meets its data or its files (issue #13): class names are compared, manifests are checksummed.

- An export records the class names it was trained with; data whose classes differ (an ImageFolder missing one
  class folder shifts every later label) is refused in :func:`studio.data.prepare`, the one place every flow,
  evaluation and analysis meets its data.
- An export's manifest carries sha256 digests of its weights and of every field that changes what the model
  computes; a manifest edited after export (a kept index, the architecture, ``scale_policy``, ``act_layer``, the
  mean) is refused on load with one sentence; exports older than the checksum load with a warning.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.data import DataSpec, check_labels, load_split, prepare
from studio.errors import StudioError
from studio.export import MANIFEST, WEIGHTS, export, load_exported
from studio.load import load_model
from studio.models import DEMO_SOURCES, LoadedModel, ModelSpec, create_vit, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.surgery import apply_plan

ARCH = "vit_tiny_patch16_224"
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _folder(root: Path, classes: list[str], splits: tuple[str, ...] = ("train", "val")) -> DataSpec:
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            Image.fromarray(np.full((8, 8), 40 * len(c), np.uint8)).save(d / "a.png")
    return DataSpec("imagefolder", str(root))


def _export(tmp_path: Path, **kw) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_vit(ARCH, **KW).eval()
    base = describe_base(model, ARCH, KW)
    plan = PrunePlan(base, (BlockPlan(0, heads=(0, 2)), BlockPlan(1, mlp=tuple(range(40)))))
    pruned = apply_plan(copy.deepcopy(model), plan).eval()
    data = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    folder = export(pruned, base, tmp_path / "export", plan=plan, data_config=data, **kw)
    return pruned, folder


# ------------------------------------------------------------------------------------------------ classes
def test_demo_refuses_an_imagefolder_missing_one_class(tmp_path):
    """The issue's case: digits 1..9 only, so '1' would be read as label 0 and every label shifts by one."""
    demo = load_model(ModelSpec("demo", device="cpu"))
    assert demo.known_class_names == [str(i) for i in range(10)]
    spec = _folder(tmp_path, [str(i) for i in range(1, 10)])
    with pytest.raises(StudioError) as e:
        prepare(spec, "val", demo.data_config, 10, class_names=demo.known_class_names)
    msg = str(e.value)
    assert "not the 10 the model was trained with: it lacks '0'" in msg and "\n" not in msg
    # the label range alone cannot see it: every shifted label is still a valid index
    assert check_labels(load_split(spec, "val"), 10, class_names=None) is None


def test_extra_and_reordered_classes_are_named(tmp_path):
    model = ["cat", "dog", "fox"]
    with pytest.raises(StudioError, match=r"it lacks 'fox'; it has 'cow', which the model does not know"):
        check_labels(
            load_split(_folder(tmp_path / "a", ["cat", "cow", "dog"]), "train"), 3, class_names=model
        )
    ds = load_split(_folder(tmp_path / "b", model), "train")
    with pytest.raises(StudioError, match="another order"):
        check_labels(ds, 3, class_names=["dog", "cat", "fox"])
    check_labels(ds, 3, class_names=model)  # the same classes in the same order pass


def test_the_cli_refuses_mismatched_classes_in_one_line(tmp_path, capsys):
    from studio.cli import main

    spec = _folder(tmp_path, [str(i) for i in range(1, 10)])
    assert main(["eval", "--data", f"imagefolder:{spec.path}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: The data's classes") and "lacks '0'" in err and len(err.splitlines()) == 1


def test_unknown_names_and_label_only_data_are_not_compared(tmp_path):
    # a bare checkpoint (or a fresh head) has placeholder names: any class folders may be its classes
    torch.manual_seed(0)
    m = create_vit(ARCH, **{**KW, "num_classes": 2})
    torch.save(m.state_dict(), tmp_path / "m.pth")
    kwargs = {k: v for k, v in KW.items() if k not in ("img_size", "num_classes")}
    bare = load_model(ModelSpec(str(tmp_path / "m.pth"), arch=ARCH, img_size=32, kwargs=kwargs, device="cpu"))
    assert bare.known_class_names is None
    spec = _folder(tmp_path / "cd", ["cat", "dog"])
    assert len(prepare(spec, "train", bare.data_config, 2, class_names=bare.known_class_names)) == 2
    reset = load_model(ModelSpec("demo", num_classes=2, reset_head=True, device="cpu"))
    assert reset.known_class_names is None
    # VTAB lists carry labels only: their "names" are numbers and say nothing about the model's classes
    (tmp_path / "v" / "i").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "v" / "i" / "0.png")
    (tmp_path / "v" / "train800.txt").write_text("i/0.png 1\n")
    vtab = load_split(DataSpec("vtab", str(tmp_path / "v")), "train")
    assert not vtab.named
    check_labels(vtab, 3, class_names=["cat", "dog", "fox"])


def test_exports_record_class_names_and_whether_they_are_known(tmp_path):
    _, named = _export(tmp_path / "a", class_names=list("abcde"))
    manifest = json.loads((named / MANIFEST).read_text())
    assert manifest["class_names"] == list("abcde") and manifest["class_names_known"] is True
    assert load_exported(named, device="cpu").known_class_names == list("abcde")
    _, unnamed = _export(tmp_path / "b")
    assert json.loads((unnamed / MANIFEST).read_text())["class_names_known"] is False
    loaded = load_exported(unnamed, device="cpu")
    assert loaded.class_names == [str(i) for i in range(5)] and loaded.known_class_names is None
    # re-exporting a loaded model carries its names and whether they are known
    from studio.export import export_loaded

    again = export_loaded(loaded.model, loaded, tmp_path / "c", plan=loaded.plan)
    assert load_exported(again, device="cpu").known_class_names is None


def test_every_caller_states_the_models_classes():
    """``class_names`` has no default: a new flow cannot meet its data without the check."""
    import inspect

    for fn in (prepare, check_labels):
        param = inspect.signature(fn).parameters["class_names"]
        assert param.kind is param.KEYWORD_ONLY and param.default is param.empty, fn.__name__
    lm = LoadedModel.from_module(create_vit(ARCH, **KW), ARCH, KW, class_names=list("abcde"))
    assert lm.known_class_names == list("abcde")
    assert LoadedModel.from_module(create_vit(ARCH, **KW), ARCH, KW).known_class_names is None


# ---------------------------------------------------------------------------------------------- integrity
def _edit(folder: Path, fn: Callable[[dict], None]) -> None:
    m = json.loads((folder / MANIFEST).read_text())
    fn(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def _both_bases(key: str, value) -> Callable[[dict], None]:
    """Change the base and the plan's copy of it alike, so only the checksum can tell."""

    def fn(m: dict) -> None:
        for b in (m["base"], m["plan"]["base"]):
            if key == "arch":
                b["arch"] = value
            else:
                b["kwargs"][key] = value

    return fn


def _kept_head(m: dict) -> None:
    m["plan"]["blocks"][0]["heads"] = [0, 1]


def _scale(m: dict) -> None:
    m["plan"]["scale_policy"] = "reset"


def _mean(m: dict) -> None:
    m["data_config"]["mean"] = [0.485, 0.456, 0.406]


def _names(m: dict) -> None:
    m["class_names"] = list("edcba")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_kept_head, "'plan'"),
        (_both_bases("arch", "vit_small_patch16_224"), "'base', 'plan'"),
        (_scale, "'plan'"),
        (_both_bases("act_layer", "relu"), "'base', 'plan'"),
        (_mean, "'data_config'"),
        (_names, "'class_names'"),
    ],
    ids=["kept index", "arch", "scale_policy", "act_layer", "mean", "class names"],
)
def test_a_manifest_changed_after_export_is_refused(tmp_path, edit, field):
    _, folder = _export(tmp_path, class_names=list("abcde"))
    _edit(folder, edit)
    with pytest.raises(StudioError) as e:
        load_exported(folder, device="cpu")
    msg = str(e.value)
    assert (
        f"was changed after export: the checksum recorded in manifest.json no longer fits its {field}," in msg
    )
    assert "\n" not in msg


def test_changed_weights_are_refused_and_an_intact_export_loads_identically(tmp_path):
    from safetensors.torch import load_file, save_file

    pruned, folder = _export(tmp_path, class_names=list("abcde"))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact export loads without the no-checksum warning
        assert torch.equal(load_exported(folder, device="cpu").model(X), pruned(X))
    sd = load_file(str(folder / WEIGHTS))
    sd["head.bias"] = sd["head.bias"] + 1
    save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(StudioError, match=r"no longer fits its weights \(model\.safetensors\), so"):
        load_exported(folder, device="cpu")


def test_an_export_without_a_checksum_loads_with_a_warning(tmp_path):
    pruned, folder = _export(tmp_path, class_names=list("abcde"))
    _edit(folder, lambda m: m.pop("integrity"))
    with pytest.warns(UserWarning, match="has no checksum"):
        loaded = load_exported(folder, device="cpu")
    with torch.inference_mode():
        assert torch.equal(loaded.model(X), pruned(X))
    _edit(folder, lambda m: m.update(integrity="xyz"))
    with pytest.raises(StudioError, match="unreadable 'integrity' section"):
        load_exported(folder, device="cpu")


def test_the_embedded_demo_carries_a_valid_checksum():
    for folder in DEMO_SOURCES.values():
        assert json.loads((folder / MANIFEST).read_text())["integrity"]["algorithm"] == "sha256"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_exported(folder, device="cpu")


def test_huge_base_kwargs_are_refused_before_anything_is_allocated(tmp_path):
    _, folder = _export(tmp_path, class_names=list("abcde"))
    _edit(folder, _both_bases("embed_dim", 10**9))
    with pytest.raises(
        StudioError, match=r"kwargs give embed_dim=1000000000 where the base says embed_dim=48"
    ):
        load_exported(folder, device="cpu")
    _, folder = _export(tmp_path / "b", class_names=list("abcde"))
    _edit(folder, _both_bases("img_size", 10**6))
    with pytest.raises(StudioError, match=r"img_size=1000000 is not a size from 1 to 8192 pixels"):
        load_exported(folder, device="cpu")
