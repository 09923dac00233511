"""The server's reach (issue #13): one path guard (:mod:`studio.safety`) for every path a page takes.

Default roots leave the home folder out; a refusal reads the same whether or not the file exists outside the
roots and never shows where a symbolic link leads; the Retrain "Teacher" and Adapters "Backbone" fields, VTAB
list entries, symlinked class folders and manifest kwargs that name files are all refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from studio.data import DataSpec, load_split
from studio.errors import StudioError
from studio.models import ModelSpec
from studio.safety import (
    allowed_roots,
    check_path,
    check_timm_kwargs,
    guard_data,
    guard_model_source,
    guard_spec,
)

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


@pytest.fixture
def roots(tmp_path, monkeypatch) -> Path:
    """``tmp/inside`` is the one named root; ``tmp/outside`` is not a root; HOME is ``tmp/home``."""
    (tmp_path / "inside").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("STUDIO_DATA_ROOTS", str(tmp_path / "inside"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8)).save(path)


def test_default_roots_leave_the_home_folder_out(roots, monkeypatch):
    monkeypatch.delenv("STUDIO_DATA_ROOTS")
    secret = roots / "home" / ".ssh" / "id_rsa.pth"
    secret.parent.mkdir()
    secret.write_bytes(b"key")
    assert Path.home().resolve() not in allowed_roots()
    with pytest.raises(StudioError, match="outside the folders"):
        check_path(str(secret), what="Checkpoint")
    # the project's own folders and the working directory's data folders stay readable
    runs = Path(os.environ.get("STUDIO_RUNS", "runs"))
    assert {runs.resolve(), (Path.cwd() / "data").resolve(), (ROOT / "assets").resolve()} <= set(
        allowed_roots()
    )


def test_a_refusal_does_not_tell_whether_the_file_exists_or_where_a_link_leads(roots):
    (roots / "outside" / "real.pth").write_bytes(b"x")
    (roots / "inside" / "link.pth").symlink_to(roots / "outside" / "real.pth")
    (roots / "inside" / "dangling.pth").symlink_to(roots / "outside" / "nothing.pth")
    messages = {}
    for name in ("link.pth", "dangling.pth"):
        with pytest.raises(StudioError) as e:
            check_path(str(roots / "inside" / name), what="Checkpoint", kind="file")
        messages[name] = str(e.value).replace(name, "NAME")
        assert "outside" in str(e.value) and str(roots / "outside") not in str(e.value)
    assert messages["link.pth"] == messages["dangling.pth"]
    direct = set()
    for target in ("real.pth", "nothing.pth"):  # typed directly: the same sentence for both too
        with pytest.raises(StudioError) as e:
            check_path(str(roots / "outside" / target), what="Checkpoint", kind="file")
        direct.add(str(e.value).replace(target, "NAME"))
    assert len(direct) == 1


def test_teacher_and_backbone_fields_and_every_model_of_a_job_are_guarded(roots):
    from studio.flows.prune import PruneSpec
    from studio.flows.retrain import RecoverySpec

    outside = roots / "outside" / "teacher.pth"
    outside.write_bytes(b"x")
    spec = RecoverySpec(
        model=ModelSpec("demo"), data=DataSpec("demo"), teacher=ModelSpec(str(outside)), preset="quick"
    )
    with pytest.raises(StudioError, match=r"^Teacher '.*teacher.pth' is outside the folders"):
        guard_spec(spec)
    backbone = PruneSpec(model=ModelSpec(str(outside)), method="splora", params={}, data=DataSpec("demo"))
    with pytest.raises(StudioError, match=r"^Backbone '.*' is outside the folders"):
        guard_spec(backbone, names={"model": "Backbone"})
    guard_spec(
        RecoverySpec(model=ModelSpec("demo"), data=DataSpec("demo"), teacher=ModelSpec("demo-backbone"))
    )
    assert guard_model_source("demo-backbone", what="Backbone") == "demo-backbone"


def test_adapters_page_refuses_a_backbone_outside_the_roots(roots, monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page("pages/5_adapters.py").run()
    at.text_input(key="adapters_model").set_value(str(roots / "outside" / "b.pth")).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert any(e.startswith("Backbone '") and "outside the folders" in e for e in errors), errors
    assert at.button(key="adapters_start").disabled  # no job can start with it


def test_vtab_entries_may_not_leave_their_folder(roots):
    vtab = roots / "inside" / "vtab"
    _png(vtab / "images" / "a.png")
    _png(roots / "outside" / "b.png")
    for entry in (str(roots / "outside" / "b.png"), "../../outside/b.png", "images/../../../outside/b.png"):
        for name in ("train800.txt", "val200.txt", "test.txt"):
            (vtab / name).write_text(f"images/a.png 0\n{entry} 1\n")
        with pytest.raises(StudioError, match=r"line 2: image path .* leaves the VTAB folder"):
            load_split(DataSpec("vtab", str(vtab)), "train")  # every caller, the CLI included
    # a link inside the folder that leads outside: refused by the server's guard, whether its target exists
    for target in ("b.png", "missing.png"):
        link = vtab / "images" / f"to-{target}"
        link.symlink_to(roots / "outside" / target)
        for name in ("train800.txt", "val200.txt", "test.txt"):
            (vtab / name).write_text(f"images/a.png 0\nimages/{link.name} 1\n")
        with pytest.raises(StudioError, match=r"train800\.txt line 2 leads outside the folders"):
            guard_data(DataSpec("vtab", str(vtab)))


def test_symlinked_class_folders_leading_outside_are_refused(roots):
    data = roots / "inside" / "imgs"
    for split in ("train", "val"):
        _png(data / split / "cat" / "a.png")
    _png(roots / "outside" / "dogs" / "b.png")
    guard_data(DataSpec("imagefolder", str(data)))  # a plain tree passes
    (data / "train" / "dog").symlink_to(roots / "outside" / "dogs")
    with pytest.raises(StudioError, match=r"train/dog leads outside the folders") as e:
        guard_data(DataSpec("imagefolder", str(data)))
    (data / "train" / "dog").unlink()
    (data / "train" / "dog").symlink_to(roots / "outside" / "no-such-folder")
    with pytest.raises(StudioError) as e2:
        guard_data(DataSpec("imagefolder", str(data)))
    assert str(e2.value) == str(e.value)  # a missing target reads the same
    (data / "train" / "dog").unlink()
    (data / "train" / "cat" / "b.png").symlink_to(roots / "outside" / "dogs" / "b.png")  # one image
    with pytest.raises(StudioError, match=r"train/cat/b.png leads outside"):
        guard_data(DataSpec("imagefolder", str(data)))


def test_timm_kwargs_that_name_files_are_refused(roots):
    for kwargs in (
        {"checkpoint_path": "/etc/hostname"},
        {"pretrained": True},
        {"pretrained_cfg_overlay": {"file": "/etc/hostname"}},
    ):
        with pytest.raises(StudioError, match="would make the model read a file"):
            check_timm_kwargs(kwargs, where="Extra timm kwargs")
    check_timm_kwargs({"patch_size": 8, "pretrained_cfg_overlay": {"mean": [0.5] * 3}}, where="x")
    export = roots / "inside" / "export"
    export.mkdir()
    manifest = {"schema": "pruning-studio/model", "version": 1, "base": {"kwargs": {"checkpoint_path": "/x"}}}
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StudioError, match=r"manifest.json: the timm kwarg 'checkpoint_path'"):
        guard_model_source(str(export), what="Exported folder")
