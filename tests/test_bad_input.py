"""Bad input the studio must refuse with a clear message (a StudioError shown as ``st.error``), never a traceback.

Most cases go through the Model page in AppTest exactly as a user would (pick a source, type a path, press Load)
and check the message the page shows, that no exception element appears and that the previous selection stays.
The rest call the engine function behind the widget (budgets, plan files, uploads) because the widget itself
cannot produce the bad value (a bounded slider) or AppTest cannot drive it (file uploads).

``python tests/test_bad_input.py`` rewrites docs/results/bad_input.md from the messages these cases produce.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
TINY_JSON = json.dumps({k: v for k, v in TINY.items() if k != "img_size"})


@contextlib.contextmanager
def _roots(folder: Path) -> Iterator[None]:
    old = os.environ.get("STUDIO_DATA_ROOTS")
    os.environ["STUDIO_DATA_ROOTS"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("STUDIO_DATA_ROOTS", None)
        else:
            os.environ["STUDIO_DATA_ROOTS"] = old


def _tiny_state(num_classes: int = 5) -> dict[str, torch.Tensor]:
    from studio.models import create_vit

    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", num_classes=num_classes, **TINY).state_dict()


def model_page(
    tmp: Path,
    *,
    source: str = "checkpoint",
    path: str = "",
    arch: str = "vit_tiny_patch16_224",
    classes: int = 0,
    kwargs: str = TINY_JSON,
    data: str = "demo",
    data_path: str = "",
) -> str:
    """Drive the Model page's picker and return the error it shows (asserting no traceback, selection kept)."""
    with _roots(tmp):
        at = AppTest.from_file(APP, default_timeout=180).run()
        at.radio(key="pick_model_source").set_value(source).run()
        if source == "checkpoint":
            at.text_input(key="pick_ckpt_path").set_value(path)
            at.text_input(key="pick_arch").set_value(arch)
            at.number_input(key="pick_classes").set_value(classes)
            at.number_input(key="pick_img").set_value(32)
            at.text_input(key="pick_kwargs").set_value(kwargs)
        elif source == "export":
            at.text_input(key="pick_export_path").set_value(path)
        at.radio(key="pick_data_kind").set_value(data).run()
        if data != "demo":
            at.text_input(key="pick_data_path").set_value(data_path)
        at.button(key="pick_load").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["studio_model_spec"].source == "demo", "a failed load must keep the old selection"
    errors = [e.value for e in at.error]
    assert len(errors) == 1, errors
    return errors[0]


def engine(fn: Callable[[], object]) -> str:
    from studio.errors import StudioError

    with pytest.raises(StudioError) as e:
        fn()
    return str(e.value)


# ------------------------------------------------------------------------------------------------ the cases
def corrupt_safetensors(tmp: Path) -> str:
    (tmp / "m.safetensors").write_bytes(os.urandom(4096))
    return model_page(tmp, path=str(tmp / "m.safetensors"))


def truncated_pth(tmp: Path) -> str:
    torch.save(_tiny_state(), tmp / "full.pth")
    data = (tmp / "full.pth").read_bytes()
    (tmp / "m.pth").write_bytes(data[: len(data) // 2])
    return model_page(tmp, path=str(tmp / "m.pth"))


class _Payload:
    """Unpickling this would create a file: the test checks it never appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickled_object_pth(tmp: Path) -> str:
    torch.save({"model": _Payload(tmp / "PWNED")}, tmp / "m.pth")
    msg = model_page(tmp, path=str(tmp / "m.pth"))
    assert not (tmp / "PWNED").exists(), "the pickled payload ran"
    return msg


def raw_pickle_pth(tmp: Path) -> str:
    (tmp / "m.pth").write_bytes(pickle.dumps(_Payload(tmp / "PWNED")))
    msg = model_page(tmp, path=str(tmp / "m.pth"))
    assert not (tmp / "PWNED").exists(), "the pickled payload ran"
    return msg


def non_vit_arch(tmp: Path) -> str:
    save_file(_tiny_state(), str(tmp / "m.safetensors"))
    return model_page(tmp, path=str(tmp / "m.safetensors"), arch="resnet18", kwargs="{}")


def unknown_arch(tmp: Path) -> str:
    save_file(_tiny_state(), str(tmp / "m.safetensors"))
    return model_page(tmp, path=str(tmp / "m.safetensors"), arch="vit_enormous_patch3_999")


def class_count_mismatch(tmp: Path) -> str:
    save_file(_tiny_state(5), str(tmp / "m.safetensors"))
    return model_page(tmp, path=str(tmp / "m.safetensors"), classes=10)


def missing_keys(tmp: Path) -> str:
    sd = {k: v for k, v in _tiny_state().items() if not k.startswith("blocks.1.")}
    save_file(sd, str(tmp / "m.safetensors"))
    return model_page(tmp, path=str(tmp / "m.safetensors"))


def weights_of_another_width(tmp: Path) -> str:
    save_file(_tiny_state(), str(tmp / "m.safetensors"))
    return model_page(
        tmp, path=str(tmp / "m.safetensors"), kwargs=json.dumps({**json.loads(TINY_JSON), "embed_dim": 96})
    )


def bad_kwargs_json(tmp: Path) -> str:
    save_file(_tiny_state(), str(tmp / "m.safetensors"))
    return model_page(tmp, path=str(tmp / "m.safetensors"), kwargs="{patch_size: 8")


def path_outside_roots(tmp: Path) -> str:
    return model_page(tmp, path=str(ROOT / "README.md"))


def missing_file(tmp: Path) -> str:
    return model_page(tmp, path=str(tmp / "nope.safetensors"))


def export_with_damaged_manifest(tmp: Path) -> str:
    (tmp / "export").mkdir()
    (tmp / "export" / "manifest.json").write_text('{"schema": "pruning-studio/model", "version": 1,')
    return model_page(tmp, source="export", path=str(tmp / "export"))


def _png(path: Path, size: tuple[int, int] = (8, 8), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def empty_class_folder(tmp: Path) -> str:
    for split in ("train", "test"):
        _png(tmp / "imgs" / split / "0" / "a.png")
        (tmp / "imgs" / split / "1").mkdir(parents=True)
    return model_page(tmp, source="demo", data="imagefolder", data_path=str(tmp / "imgs"))


def _digit_folders(root: Path) -> None:
    """An ImageFolder with the demo's ten classes, so the case meets the check it is about (not class names)."""
    for split in ("train", "test"):
        for c in range(10):
            _png(root / split / str(c) / "a.png")


def corrupt_image(tmp: Path) -> str:
    _digit_folders(tmp / "imgs")
    (tmp / "imgs" / "train" / "1" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return model_page(tmp, source="demo", data="imagefolder", data_path=str(tmp / "imgs"))


def decompression_bomb(tmp: Path) -> str:
    _digit_folders(tmp / "imgs")
    _png(tmp / "imgs" / "train" / "0" / "huge.png", (10_000, 10_000), mode="1")  # 100 Mpx in ~15 kB
    return model_page(tmp, source="demo", data="imagefolder", data_path=str(tmp / "imgs"))


def imagefolder_without_train(tmp: Path) -> str:
    _png(tmp / "imgs" / "test" / "0" / "a.png")
    return model_page(tmp, source="demo", data="imagefolder", data_path=str(tmp / "imgs"))


def _vtab(tmp: Path, lines: list[str]) -> str:
    root = tmp / "vtab"
    _png(root / "images" / "a.png")
    for name in ("train800.txt", "val200.txt", "test.txt"):
        (root / name).write_text("\n".join(lines) + "\n")
    return model_page(tmp, source="demo", data="vtab", data_path=str(root))


def vtab_missing_file(tmp: Path) -> str:
    return _vtab(tmp, ["images/a.png 0", "images/missing.png 1"])


def vtab_bad_label(tmp: Path) -> str:
    return _vtab(tmp, ["images/a.png 0", "images/a.png three"])


def vtab_label_out_of_range(tmp: Path) -> str:
    return _vtab(tmp, ["images/a.png 0", "images/a.png 12"])


def _plan_request(target: float):
    from studio.load import load_model
    from studio.models import ModelSpec
    from studio.prune import PruneRequest, make_plan

    loaded = load_model(ModelSpec("demo", device="cpu"))
    return lambda: make_plan("magnitude", PruneRequest(loaded, {"target_macs": target}))


def budget_zero(tmp: Path) -> str:
    return engine(_plan_request(0.0))


def budget_above_one(tmp: Path) -> str:
    return engine(_plan_request(1.5))


def _demo_base():
    from studio.load import load_model
    from studio.models import ModelSpec

    return load_model(ModelSpec("demo", device="cpu")).base


def plan_not_json(tmp: Path) -> str:
    from studio.workflow import load_plan_text

    return engine(lambda: load_plan_text('{"schema": "pruning-studio/plan", "blocks": [', _demo_base()))


def plan_index_out_of_range(tmp: Path) -> str:
    from studio.plan import PrunePlan
    from studio.workflow import load_plan_text

    d = PrunePlan.dense(_demo_base()).to_dict()
    d["blocks"][0]["heads"] = [0, 7]
    return engine(lambda: load_plan_text(json.dumps(d), _demo_base()))


def plan_for_another_model(tmp: Path) -> str:
    from dataclasses import replace

    from studio.plan import PrunePlan
    from studio.workflow import load_plan_text

    other = replace(_demo_base(), num_classes=100)
    return engine(lambda: load_plan_text(PrunePlan.dense(other).to_json(), _demo_base()))


def upload_too_large(tmp: Path) -> str:
    from studio.safety import save_upload

    old = os.environ.get("STUDIO_MAX_UPLOAD_MB")
    os.environ["STUDIO_MAX_UPLOAD_MB"] = "1"
    try:
        return engine(lambda: save_upload("big.safetensors", b"\0" * (2 * 2**20)))
    finally:
        os.environ.pop("STUDIO_MAX_UPLOAD_MB") if old is None else os.environ.__setitem__(
            "STUDIO_MAX_UPLOAD_MB", old
        )


def upload_wrong_type(tmp: Path) -> str:
    from studio.safety import save_upload

    return engine(lambda: save_upload("weights.exe", b"MZ" + os.urandom(64)))


def _prune_spec(method: str, params: dict):
    from studio.data import DataSpec
    from studio.flows.prune import PruneSpec
    from studio.models import ModelSpec

    return PruneSpec(ModelSpec("demo"), method, params, DataSpec("demo"))


def p3b_schedule_without_updates(tmp: Path) -> str:
    return engine(lambda: _prune_spec("p3b", {"epochs": 4, "start_epoch": 0, "finalize_epoch": 0}).validate())


def option_of_another_method(tmp: Path) -> str:
    return engine(lambda: _prune_spec("p3b", {"target_macs": 0.5}).validate())


def out_folder_with_other_files(tmp: Path) -> str:
    from studio.flows import create_run

    (tmp / "mine").mkdir()
    (tmp / "mine" / "plan.json").write_text("{}")
    return engine(lambda: create_run(_prune_spec("magnitude", {"target_macs": 0.5}), tmp / "mine"))


def export_over_an_export(tmp: Path) -> str:
    from studio.export import export
    from studio.models import create_vit, describe_base

    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=5)
    m = create_vit("vit_tiny_patch16_224", **kw)
    export(m, describe_base(m, "vit_tiny_patch16_224", kw), tmp / "e")
    return engine(lambda: export(m, describe_base(m, "vit_tiny_patch16_224", kw), tmp / "e"))


def cli(argv: list[str]) -> str:
    """The one line a CLI command prints on stderr when it refuses its arguments (exit status 2)."""
    import io
    from contextlib import redirect_stderr

    from studio.cli import main

    err = io.StringIO()
    with redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, lines)
    return lines[0]


def imagefolder_missing_a_class(tmp: Path) -> str:
    from studio.data import DataSpec, prepare
    from studio.load import load_model
    from studio.models import ModelSpec

    for split in ("train", "val"):
        for c in range(1, 10):
            _png(tmp / split / str(c) / "a.png")
    demo = load_model(ModelSpec("demo", device="cpu"))
    spec = DataSpec("imagefolder", str(tmp))
    return engine(lambda: prepare(spec, "val", demo.data_config, 10, class_names=demo.known_class_names))


def manifest_edited_after_export(tmp: Path) -> str:
    from studio.export import export, load_exported
    from studio.models import create_vit
    from studio.plan import BlockPlan, PrunePlan
    from studio.surgery import apply_plan

    base = _demo_base()
    plan = PrunePlan(base, (BlockPlan(0, heads=(0, 2)),))
    export(apply_plan(create_vit(base.arch, **base.kwargs), plan), base, tmp / "e", plan=plan)
    m = json.loads((tmp / "e" / "manifest.json").read_text())
    m["plan"]["blocks"][0]["heads"] = [0, 1]  # still a valid plan: only the checksum can tell
    (tmp / "e" / "manifest.json").write_text(json.dumps(m))
    return engine(lambda: load_exported(tmp / "e", device="cpu"))


def manifest_with_huge_kwargs(tmp: Path) -> str:
    from studio.export import export, load_exported
    from studio.models import create_vit

    base = _demo_base()
    export(create_vit(base.arch, **base.kwargs), base, tmp / "e")
    m = json.loads((tmp / "e" / "manifest.json").read_text())
    m["base"]["kwargs"]["embed_dim"] = 1_000_000_000  # 1 KB of JSON that would allocate gigabytes
    (tmp / "e" / "manifest.json").write_text(json.dumps(m))
    return engine(lambda: load_exported(tmp / "e", device="cpu"))


def batch_size_zero(tmp: Path) -> str:
    return cli(["prune", "--method", "magnitude", "--batch-size", "0"])


def bench_repeats_zero(tmp: Path) -> str:
    return cli(["bench", "--repeats", "0"])


def epochs_1e20(tmp: Path) -> str:
    return cli(["retrain", "--out", str(tmp / "r"), "--epochs", "1e20"])


def lr_nan(tmp: Path) -> str:
    return cli(["retrain", "--out", str(tmp / "r"), "--lr", "nan"])


def warmup_negative(tmp: Path) -> str:
    return cli(["retrain", "--out", str(tmp / "r"), "--warmup-epochs", "-5"])


def timm_kwargs_list(tmp: Path) -> str:
    return cli(["info", "--timm-kwargs", "[1,2]"])


def foreign_checkpoint_on_resume(tmp: Path) -> str:
    from studio.models import create_vit
    from studio.train import TrainSpec, fit

    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "checkpoint.pt")
    data = torch.utils.data.TensorDataset(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]))
    model = create_vit("vit_tiny_patch16_224", **kw)
    spec = TrainSpec(epochs=1, batch_size=3, lr=1e-3)
    return engine(lambda: fit(model, data, None, spec, checkpoint=tmp / "checkpoint.pt", resume=True))


def same_device_other_runs_folder(tmp: Path) -> str:
    from studio import jobs

    old = os.environ.get(jobs.LOCK_DIR_ENV)
    os.environ[jobs.LOCK_DIR_ENV] = str(tmp / "locks")
    held = jobs._acquire(["cpu"], tmp / "one" / "runs" / "first")  # a live holder: this process
    try:

        def second() -> None:
            with jobs.device_lock("cpu", tmp / "two" / "other-runs" / "second"):
                pass

        return engine(second)
    finally:
        for p in held:
            p.unlink()
        if old is None:
            os.environ.pop(jobs.LOCK_DIR_ENV, None)
        else:
            os.environ[jobs.LOCK_DIR_ENV] = old


# ------------------------------------------------------------------------------ the server's reach (path guard)
def home_folder_file(tmp: Path) -> str:
    # nothing is created there: the refusal reads the same whether or not the file exists
    return model_page(tmp, path=str(Path.home() / ".ssh" / "id_rsa.pth"))


def vtab_absolute_entry(tmp: Path) -> str:
    return _vtab(tmp, ["images/a.png 0", "/etc/hostname 1"])


def vtab_parent_entry(tmp: Path) -> str:
    return _vtab(tmp, ["images/a.png 0", "../../etc/hostname 1"])


def symlinked_class_folder(tmp: Path) -> str:
    _digit_folders(tmp / "imgs")
    outside = Path(tempfile.mkdtemp())  # not under the roots (only ``tmp`` is)
    (tmp / "imgs" / "train" / "9" / "a.png").unlink()
    (tmp / "imgs" / "train" / "9").rmdir()
    (tmp / "imgs" / "train" / "9").symlink_to(outside)
    return model_page(tmp, source="demo", data="imagefolder", data_path=str(tmp / "imgs"))


def manifest_kwarg_names_a_file(tmp: Path) -> str:
    from studio.export import export_loaded
    from studio.load import load_model
    from studio.models import ModelSpec

    demo = load_model(ModelSpec("demo", device="cpu"))
    folder = export_loaded(demo.model, demo, tmp / "e", plan=None)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["base"]["kwargs"]["checkpoint_path"] = "/etc/hostname"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return model_page(tmp, source="export", path=str(folder))


def form_kwarg_names_a_file(tmp: Path) -> str:
    save_file(_tiny_state(), str(tmp / "m.safetensors"))
    kwargs = json.dumps({**json.loads(TINY_JSON), "pretrained_cfg_overlay": {"file": "/etc/shadow"}})
    return model_page(tmp, path=str(tmp / "m.safetensors"), kwargs=kwargs)


def teacher_outside_roots(tmp: Path) -> str:
    from studio.data import DataSpec
    from studio.flows.retrain import RecoverySpec
    from studio.models import ModelSpec
    from studio.safety import guard_spec

    spec = RecoverySpec(model=ModelSpec("demo"), data=DataSpec("demo"), teacher=ModelSpec("/etc/teacher.pth"))
    with _roots(tmp):
        return engine(lambda: guard_spec(spec))


def recipe_nan_in_spec(tmp: Path) -> str:
    from studio.data import DataSpec
    from studio.flows.retrain import RecoverySpec
    from studio.models import ModelSpec

    spec = RecoverySpec(model=ModelSpec("demo"), data=DataSpec("demo"), overrides={"lr": float("nan")})
    return engine(spec.validate)


def status_left_running(tmp: Path) -> str:
    from studio import jobs
    from studio.runs import RunDir

    run = RunDir.create(tmp / "r", {"kind": "retrain"})
    run.set_status("running", pid=2**22 + 4321, pid_start=1)  # the trainer is gone; its folder went read-only
    return str(jobs.job_status(run.path).error)


def cancel_of_another_session_s_job(tmp: Path) -> str:
    from studio import jobs
    from studio.runs import RunDir, write_json

    run = RunDir.create(tmp / "theirs", {"kind": "retrain"})
    write_json(run.path / "job.json", {"command": ["run", str(run.path)], "owner": jobs.owner_id("b" * 32)})
    return engine(lambda: jobs.cancel_job(run.path, owner="a" * 32))


def img_size_for_a_built_model(tmp: Path) -> str:
    from studio.load import load_model
    from studio.models import ModelSpec

    return engine(lambda: load_model(ModelSpec("demo", img_size=64, device="cpu")))


def integer_weights(tmp: Path) -> str:
    import torch
    from safetensors.torch import save_file

    from studio.load import load_model
    from studio.models import ModelSpec, create_vit

    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    sd = {k: v.contiguous() for k, v in create_vit("vit_tiny_patch16_224", **kw).state_dict().items()}
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].mul(100).to(torch.int32)
    save_file(sd, str(tmp / "q.safetensors"))
    spec = ModelSpec(str(tmp / "q.safetensors"), arch="vit_tiny_patch16_224", device="cpu", kwargs=kw)
    return engine(lambda: load_model(spec))


def unsupported_family(tmp: Path) -> str:
    from studio.models import create_vit

    return engine(lambda: create_vit("vit_dpwee_patch16_reg1_gap_256", img_size=32, patch_size=8, depth=2))


@dataclass(frozen=True)
class Case:
    fn: Callable[[Path], str]
    what: str  # the input, for the table
    where: str  # where the user meets it
    expect: str  # a fragment of the message


CASES = [
    Case(
        corrupt_safetensors, "`.safetensors` file of random bytes", "Model page", "not a readable safetensors"
    ),
    Case(truncated_pth, "`.pth` state dict cut in half", "Model page", "truncated"),
    Case(
        pickled_object_pth, "`.pth` holding a pickled object (would create a file)", "Model page", "pickled"
    ),
    Case(raw_pickle_pth, "raw `pickle.dumps` payload named `.pth`", "Model page", "refused"),
    Case(non_vit_arch, "architecture `resnet18`", "Model page", "not a Vision Transformer"),
    Case(unknown_arch, "architecture `vit_enormous_patch3_999`", "Model page", "has no architecture"),
    Case(class_count_mismatch, "5-class checkpoint, 10 classes asked", "Model page", "5 classes but 10"),
    Case(missing_keys, "checkpoint without `blocks.1.*`", "Model page", "missing keys"),
    Case(weights_of_another_width, "width-48 weights for a width-96 model", "Model page", "shape mismatch"),
    Case(bad_kwargs_json, "timm kwargs `{patch_size: 8`", "Model page", "not valid JSON"),
    Case(path_outside_roots, "a path outside `STUDIO_DATA_ROOTS`", "Model page", "outside the folders"),
    Case(missing_file, "a checkpoint path that does not exist", "Model page", "does not exist"),
    Case(
        export_with_damaged_manifest,
        "exported folder with a truncated manifest.json",
        "Model page",
        "not valid JSON",
    ),
    Case(empty_class_folder, "ImageFolder with an empty class folder", "Model page (data)", "has no images"),
    Case(corrupt_image, "ImageFolder with a corrupt PNG", "Model page (data)", "cannot be decoded"),
    Case(decompression_bomb, "10 000 × 10 000 PNG (decompression bomb)", "Model page (data)", "pixel limit"),
    Case(
        imagefolder_without_train, "ImageFolder without `train/`", "Model page (data)", "no 'train/' folder"
    ),
    Case(vtab_missing_file, "VTAB list naming a missing image", "Model page (data)", "does not exist under"),
    Case(vtab_bad_label, "VTAB list with label `three`", "Model page (data)", "is not an integer"),
    Case(vtab_label_out_of_range, "VTAB label 12 for a 10-class model", "Model page (data)", "out of range"),
    Case(budget_zero, "target MACs 0", "CLI / engine (the slider stops at 0.1)", "fraction in (0, 1]"),
    Case(budget_above_one, "target MACs 1.5", "CLI / engine (the slider stops at 1.0)", "fraction in (0, 1]"),
    Case(plan_not_json, "plan file that is not JSON", "Prune page, plan upload", "not valid JSON"),
    Case(plan_index_out_of_range, "plan keeping head 7 of 3", "Prune page, plan upload", "out of range 0..2"),
    Case(plan_for_another_model, "plan made for a 100-class model", "Prune page, plan upload", "made for"),
    Case(upload_too_large, "2 MB upload with a 1 MB limit", "Model page, upload", "over the 1 MB limit"),
    Case(upload_wrong_type, "upload named `weights.exe`", "Model page, upload", "accepted"),
    Case(
        p3b_schedule_without_updates,
        "P3B with finalize epoch 0 (no mask update)",
        "Prune page, beside Start (before any job)",
        "finalize epoch must come after",
    ),
    Case(
        option_of_another_method,
        "P3B given a MACs target",
        "CLI / spec validation",
        "has no option 'target_macs'",
    ),
    Case(
        out_folder_with_other_files,
        "`--out` a folder that holds other files",
        "CLI (prune, analyze sls --apply, retrain, run --spec)",
        "already exists and holds files",
    ),
    Case(export_over_an_export, "`export --out` an existing export", "CLI export / apply", "--overwrite"),
    Case(
        imagefolder_missing_a_class,
        "ImageFolder without class `0` for the 10-class demo (every label shifts)",
        "every flow, eval, analysis (where model meets data)",
        "it lacks '0'",
    ),
    Case(
        manifest_edited_after_export,
        "export whose manifest's kept heads were edited (still a valid plan)",
        "loading an export (Model page, CLI, retrain)",
        "was changed after export",
    ),
    Case(
        manifest_with_huge_kwargs,
        "manifest with base kwargs `embed_dim: 1000000000`",
        "loading an export (before any allocation)",
        "does not fit its base's own sizes",
    ),
    Case(batch_size_zero, "`prune --batch-size 0`", "CLI (every numeric flag)", "must be a positive integer"),
    Case(bench_repeats_zero, "`bench --repeats 0`", "CLI (every numeric flag)", "must be a positive integer"),
    Case(epochs_1e20, "`retrain --epochs 1e20`", "CLI (every numeric flag)", "is too large"),
    Case(lr_nan, "`retrain --lr nan`", "CLI (every numeric flag)", "must be a finite number"),
    Case(
        warmup_negative, "`retrain --warmup-epochs -5`", "CLI (every numeric flag)", "must be a number >= 0"
    ),
    Case(timm_kwargs_list, "`--timm-kwargs '[1,2]'`", "CLI (every model command)", "must be a JSON object"),
    Case(
        foreign_checkpoint_on_resume,
        "`checkpoint.pt` of another program on `--resume`",
        "CLI / job resume",
        "not a training checkpoint written by the studio",
    ),
    Case(
        same_device_other_runs_folder,
        "a second training on a busy device, run folder elsewhere",
        "jobs start / Start buttons / foreground retrain",
        "Device cpu is busy",
    ),
    Case(
        home_folder_file,
        "`~/.ssh/id_rsa.pth` (the home folder is not a root)",
        "Model page",
        "outside the folders",
    ),
    Case(
        vtab_absolute_entry,
        "VTAB list entry `/etc/hostname`",
        "Model page (data), every loader",
        "leaves the VTAB",
    ),
    Case(
        vtab_parent_entry,
        "VTAB list entry `../../etc/hostname`",
        "Model page (data), every loader",
        "leaves the VTAB",
    ),
    Case(
        symlinked_class_folder,
        "ImageFolder class folder that is a symlink out of the roots",
        "Model page (data)",
        "leads outside the folders",
    ),
    Case(
        manifest_kwarg_names_a_file,
        "export whose manifest kwargs hold `checkpoint_path`",
        "Model page",
        "would make the model read a file",
    ),
    Case(
        form_kwarg_names_a_file,
        "timm kwargs `{pretrained_cfg_overlay: {file: ...}}`",
        "Model page",
        "would make the model read a file",
    ),
    Case(
        teacher_outside_roots,
        "Retrain teacher `/etc/teacher.pth`",
        "Retrain page (Start)",
        "outside the folders",
    ),
    Case(
        recipe_nan_in_spec,
        "hand-edited `spec.json` with recipe override `lr: NaN`",
        "CLI run / job start",
        "must be a finite number",
    ),
    Case(
        status_left_running,
        "`status.json` left at running by a trainer that is gone (e.g. its folder went read-only)",
        "Runs page / jobs status",
        "still said 'running'",
    ),
    Case(
        cancel_of_another_session_s_job,
        "Cancel of a job another browser session started",
        "job panel (Runs, Retrain, ...)",
        "only it can cancel",
    ),
    Case(
        img_size_for_a_built_model,
        "`--img-size 64` for the demo or an export",
        "CLI / Model page",
        "Drop --img-size",
    ),
    Case(integer_weights, "a checkpoint with int32 weights", "Model page", "non-float weights"),
    Case(
        unsupported_family,
        "a timm ViT with differential-attention parallel blocks (`vit_dpwee_patch16_reg1_gap_256`)",
        "Model page",
        "DiffParallelScalingBlock",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.fn.__name__ for c in CASES])
def test_bad_input_is_a_clear_message(case: Case, tmp_path):
    msg = case.fn(tmp_path)
    assert case.expect in msg, msg
    assert "Traceback" not in msg and len(msg) < 600


def test_there_are_at_least_15_cases_and_the_table_lists_them():
    assert len(CASES) >= 15
    table = (ROOT / "docs" / "results" / "bad_input.md").read_text(encoding="utf-8")
    for c in CASES:
        assert c.what in table, (
            f"docs/results/bad_input.md lacks '{c.what}': run python tests/test_bad_input.py"
        )


def write_table(path: Path) -> None:
    """Run every case and write the markdown table of inputs and the messages users see."""
    lines = [
        "# Bad input: what the user sees",
        "",
        "Every row is a test in `tests/test_bad_input.py` (regenerate this file with "
        "`OMP_NUM_THREADS=1 .venv/bin/python tests/test_bad_input.py`). Model-page rows were produced by driving "
        "the page in Streamlit's AppTest: the message is the `st.error` the page shows, no traceback appears and "
        "the previous model stays selected.",
        "",
        "| # | input | where | what the user sees |",
        "|---|---|---|---|",
    ]
    for i, c in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as d:
            msg = (
                c.fn(Path(d)).replace(d, "/tmp/…").replace("|", "\\|").replace("\n", " ").replace("\x1b", "␛")
            )
        msg = re.sub(r"\(pid \d+\)", "(pid …)", msg)  # the table stays the same from one run to the next
        lines.append(f"| {i} | {c.what} | {c.where} | {msg} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_table(ROOT / "docs" / "results" / "bad_input.md")
    print("wrote docs/results/bad_input.md")
