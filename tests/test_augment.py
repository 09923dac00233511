"""Training augmentation on timm's parts (issue 15 item 7): the recipe options are checked before training, the
training split takes timm's training transform (drawn per image from seed, epoch and index) while validation keeps
the eval transform, resume stays exact, and a recovery run with RandAugment and random erasing round-trips them."""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import pytest
import torch

from studio import jobs
from studio.cli import build_parser
from studio.commands.jobs import _spec_from_args
from studio.data import Augmented, DataSpec, TensorData, load_split, make_transform, prepare
from studio.demo import DEMO_DATA_CONFIG
from studio.errors import Cancelled, StudioError
from studio.events import CancelToken
from studio.flows import run_folder
from studio.flows.retrain import RecoverySpec
from studio.models import ModelSpec, create_vit
from studio.recovery import PRESETS, resolve_recipe
from studio.runs import RunDir, read_json
from studio.train import EpochSampler, TrainSpec, fit
from tests.conftest import TINY_KWARGS

DEIT_AA = "rand-m9-mstd0.5-inc1"
DATA = DataSpec("demo", limit=48)


def _train(**kw) -> Augmented:
    ds = prepare(DATA, "train", DEMO_DATA_CONFIG, 10, class_names=None, **kw)
    assert isinstance(ds, Augmented)
    return ds


def _images(ds, idx) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in idx])


# ------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    "policy, needle",
    [
        ("bogus", "timm cannot build it: Unknown AA policy bogus"),
        ("rand-m9-zz", "section 'zz' has no number"),  # timm itself would silently skip it
        ("rand-m9-n2-q7", "Unknown RandAugment config section"),
        ("rand-m9-tfoo", "op set 'tfoo'"),
    ],
)
def test_a_bad_auto_augment_policy_is_refused_in_one_sentence(policy, needle):
    with pytest.raises(StudioError, match="Auto-augment policy") as e:
        TrainSpec(auto_augment=policy).validate()
    text = str(e.value)
    assert needle in text and DEIT_AA in text and text.count(". ") == 0 and text.endswith(".")
    with pytest.raises(StudioError, match=f"Auto-augment policy '{policy}' is not valid"):
        resolve_recipe("quick", overrides={"auto_augment": policy})  # the CLI and the page resolve it first
    with pytest.raises(StudioError, match="timm policy string"):
        TrainSpec(auto_augment=["rand"]).validate()  # type: ignore[arg-type]


def test_valid_policies_pass_and_none_turns_a_presets_policy_off():
    for policy in (DEIT_AA, "rand-m3-n2-inc1", "v0", "original", "augmix-m5-w4-d2", "rand-m9-tweights"):
        assert TrainSpec(auto_augment=policy).validate().augments
    off = resolve_recipe("paper:savit", overrides={"auto_augment": "none", "re_prob": 0.0})
    assert off.auto_augment is None and not off.train_spec().augments
    assert resolve_recipe("paper:savit", overrides={"auto_augment": ""}).auto_augment is None
    assert not TrainSpec().augments and TrainSpec(augment=True).augments and TrainSpec(re_prob=0.1).augments


@pytest.mark.parametrize("p", [1.5, -0.1, math.nan, math.inf])
def test_re_prob_outside_zero_one_is_refused(p):
    with pytest.raises(StudioError, match=r"re_prob must be a number in \[0, 1\]"):
        TrainSpec(re_prob=p).validate()
    with pytest.raises(StudioError, match="re_prob"):
        resolve_recipe("quick", overrides={"re_prob": p})
    with pytest.raises(StudioError, match="true or false"):
        resolve_recipe("quick", overrides={"augment": "yes"})


def test_cli_flags_reach_the_recipe_and_bad_values_stop_at_parse_time(capsys):
    parse = build_parser().parse_args
    base = ["retrain", "--model", "demo", "--data", "demo", "--out", "runs/x"]
    spec = _spec_from_args(
        parse([*base, "--kd", "none", "--auto-augment", DEIT_AA, "--re-prob", "0.25", "--mixup", "0.8"])
    )
    assert spec.overrides == {"kd": "none", "auto_augment": DEIT_AA, "re_prob": 0.25, "mixup": 0.8}
    ts = spec.recipe().train_spec()
    assert (ts.auto_augment, ts.re_prob, ts.mixup, ts.augments) == (DEIT_AA, 0.25, 0.8, True)
    assert _spec_from_args(parse([*base, "--augment"])).recipe().train_spec().augments
    off = _spec_from_args(
        parse([*base, "--preset", "paper:savit", "--no-augment", "--auto-augment", "none", "--re-prob", "0"])
    )
    assert off.overrides["augment"] is False and not off.recipe().train_spec().augments
    with pytest.raises(StudioError, match="Auto-augment policy 'rand-x9' is not valid"):
        _spec_from_args(parse([*base, "--auto-augment", "rand-x9"]))  # refused before any model loads
    with pytest.raises(SystemExit) as e:
        parse([*base, "--re-prob", "1.5"])
    assert e.value.code == 2 and "--re-prob: must be a number from 0 to 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the data
def test_with_augmentation_epochs_differ_and_validation_keeps_the_eval_transform():
    train = _train(auto_augment=DEIT_AA, re_prob=0.25)
    idx = list(range(16))
    train.set_epoch(0, seed=3)
    first = _images(train, idx)
    assert torch.equal(first, _images(train, idx))  # a pure function of (seed, epoch, index)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    train.set_epoch(1, seed=3)
    second = _images(train, idx)
    assert torch.equal(before[0], torch.get_rng_state()) and np.array_equal(
        before[1], np.random.get_state()[1]
    )
    assert first.shape == second.shape == (16, 3, 32, 32) and not torch.equal(first, second)
    assert all(not torch.equal(a, b) for a, b in zip(first, second))  # every image drawn anew
    train.set_epoch(0, seed=4)
    assert not torch.equal(first, _images(train, idx))  # another seed, other crops
    plain = torch.stack([make_transform(DEMO_DATA_CONFIG)(im) for im in _pil(DATA, "train", idx)])
    assert not torch.equal(first, plain)

    val = prepare(DATA, "val", DEMO_DATA_CONFIG, 10, class_names=None)
    assert isinstance(val, TensorData)
    eval_t = make_transform(DEMO_DATA_CONFIG)
    n = len(val)
    assert torch.equal(val.images, torch.stack([eval_t(im) for im in _pil(DATA, "val", range(n))]))


def test_without_augmentation_the_training_tensors_are_the_eval_transforms():
    train = prepare(DATA, "train", DEMO_DATA_CONFIG, 10, class_names=None)
    assert isinstance(train, TensorData)  # in memory, as before
    eval_t = make_transform(DEMO_DATA_CONFIG)
    expected = torch.stack([eval_t(im) for im in _pil(DATA, "train", range(len(train)))])
    assert torch.equal(train.images, expected)
    assert TrainSpec().augments is False and PRESETS["quick"].train_spec().augments is False
    # augmentation asked of in-memory tensors: refused, never a silent no-op
    with pytest.raises(StudioError, match="fixed tensors"):
        fit(create_vit("vit_tiny_patch16_224", **TINY_KWARGS), train, None, TrainSpec(epochs=1, re_prob=0.25))


def _pil(spec: DataSpec, split: str, idx):
    raw = load_split(spec, split)
    return [raw.image(i) for i in idx]


def test_fit_draws_each_epochs_crops_and_resumes_exactly(tmp_path):
    """fit() sets the epoch on the augmented split (its batches are the split's own draws for the sampler's
    indices) and a run cancelled mid-epoch and resumed ends with the uninterrupted run's weights."""
    train = _train(auto_augment=DEIT_AA, re_prob=0.25)
    train.ds.items = [(x, y % 5) for x, y in train.ds.items]  # the tiny model's 5 classes
    spec = TrainSpec(epochs=2, batch_size=16, lr=2e-3, warmup_epochs=0.5, seed=1, auto_augment=DEIT_AA)

    def model():
        torch.manual_seed(0)
        return create_vit("vit_tiny_patch16_224", **TINY_KWARGS)

    firsts: dict[int, torch.Tensor] = {}

    class FirstBatch:
        def after_step(self, state):
            if state.step % state.steps_per_epoch == 1:
                firsts[state.epoch] = state.batch[0].detach().clone()

    ref = model()
    fit(ref, train, None, spec, hooks=[FirstBatch()])
    for epoch in (0, 1):
        order = EpochSampler(len(train), seed=spec.seed, epoch=epoch).indices[:16]
        probe = Augmented(train.ds, seed=spec.seed, epoch=epoch)
        assert torch.equal(firsts[epoch], _images(probe, order)), epoch

    token = CancelToken()

    class StopAt:
        def after_step(self, state):
            if state.step == 4:  # mid-epoch 1 (3 steps per epoch)
                token.set()

    with pytest.raises(Cancelled):
        fit(model(), train, None, spec, hooks=[StopAt()], cancel=token, checkpoint=tmp_path / "ck.pt")
    resumed = model()
    fit(resumed, train, None, spec, checkpoint=tmp_path / "ck.pt", resume=True)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------------------------- presets
def test_the_deit_recipe_papers_set_its_augmentation_with_the_source():
    for name in ("paper:p3b", "paper:savit", "paper:isomorphic", "paper:deit"):
        r = PRESETS[name]
        assert r.re_prob == 0.25 and r.auto_augment and r.train_spec().augments, name
        assert r.auto_augment in r.source and "0.25" in r.source and "repeated augmentation" in r.source, name
    for name in ("paper:p3b", "paper:savit"):  # no distillation: Mixup and CutMix as DeiT's
        r = PRESETS[name]
        assert (r.mixup, r.cutmix, r.kd) == (0.8, 1.0, "none") and "--mixup 0.8, --cutmix 1.0" in r.source
    for name in ("paper:isomorphic", "paper:deit"):  # distilled: the studio mixes with plain CE only
        r = PRESETS[name]
        assert (r.mixup, r.cutmix, r.kd) == (0.0, 0.0, "hard") and "plain cross-entropy only" in r.source
    assert "--auto-augment ra" in PRESETS["paper:isomorphic"].source  # torchvision's RandAugment, translated
    for name in ("quick", "paper:sls"):
        r = PRESETS[name]
        assert not r.train_spec().augments and (r.mixup, r.cutmix) == (0.0, 0.0), name
    assert "without training augmentation" in PRESETS["quick"].source


# ----------------------------------------------------------------------------------------------- the run
def test_a_recovery_run_with_randaugment_and_erasing_runs_and_round_trips(tmp_path):
    spec = RecoverySpec(
        ModelSpec("demo", device="cpu"),
        DataSpec("demo", limit=32),
        None,
        preset="quick",
        overrides={
            "kd": "none",
            "epochs": 2,
            "batch_size": 16,
            "auto_augment": DEIT_AA,
            "re_prob": 0.25,
            "mixup": 0.8,
            "cutmix": 1.0,
        },
        bench=False,
        export=False,
    )
    run = RunDir.create(tmp_path / "runs" / "aug", spec.to_dict())
    result = run_folder(run)
    sec = result.section
    assert sec["train"]["epochs_run"] == 2 and read_json(run.status_file)["state"] == "done"
    assert (sec["recipe"]["auto_augment"], sec["recipe"]["re_prob"], sec["recipe"]["mixup"]) == (
        DEIT_AA,
        0.25,
        0.8,
    )
    assert all(math.isfinite(h["train_loss"]) for h in sec["train"]["history"])
    saved = read_json(run.spec_file)
    assert saved["overrides"]["auto_augment"] == DEIT_AA and saved["overrides"]["re_prob"] == 0.25
    again = RecoverySpec.from_dict(saved)
    assert again == spec
    ts = again.recipe("dense").train_spec(seed=again.seed)
    assert (ts.auto_augment, ts.re_prob, ts.augments) == (DEIT_AA, 0.25, True)
    assert TrainSpec.from_dict(ts.to_dict()) == ts  # the TrainSpec's own dict round-trips the new fields
    assert read_json(run.results_file)["retrain"]["recipe"]["auto_augment"] == DEIT_AA


# ------------------------------------------------------------------------------------------------- the page
@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    """A runs folder with one exported prune run (a tiny ViT) for the Retrain page to offer."""
    from studio.export import export
    from studio.models import describe_base
    from studio.plan import BlockPlan, PrunePlan
    from studio.surgery import apply_plan

    runs = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(runs))
    monkeypatch.setenv("STUDIO_DATA_ROOTS", str(tmp_path))
    kw = {**TINY_KWARGS, "num_classes": 10}
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", **kw).eval()
    base = describe_base(model, "vit_tiny_patch16_224", kw)
    export(model, base, tmp_path / "base", data_config=DEMO_DATA_CONFIG)
    plan = PrunePlan(base, (BlockPlan(0),), method="savit")
    spec = {"kind": "prune", "method": "savit", "model": ModelSpec(str(tmp_path / "base")).to_dict()}
    run = RunDir.create(runs / "20260101-000000-prune-savit", spec)
    plan.save(run.plan_file)
    export(apply_plan(model, plan), base, run.export_dir, plan=plan, data_config=DEMO_DATA_CONFIG)
    run.write_results({"method": "savit", "after": {"top1": 0.5, "params": 100, "macs": 1000}})
    run.set_status("done")
    return runs


def test_the_retrain_page_shows_and_sends_the_recipes_augmentation(runs_root):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120)
    at.session_state["studio_data_spec"] = DataSpec("demo", limit=16)
    at.run()
    at.switch_page("pages/7_retrain.py").run()
    at.selectbox(key="retrain_preset").set_value("paper").run()  # SAViT's paper recipe for a SAViT model
    assert not at.exception, at.exception
    at.radio(key="retrain_kd").set_value("none").run()
    assert at.number_input(key="retrain_epochs").value == 300  # the recipe's values, not the last preset's
    assert at.checkbox(key="retrain_augment").value is True
    assert at.text_input(key="retrain_aa").value == DEIT_AA
    assert at.number_input(key="retrain_re").value == 0.25
    assert (at.number_input(key="retrain_mixup").value, at.number_input(key="retrain_cutmix").value) == (
        0.8,
        1.0,
    )
    assert not at.error and not at.button(key="retrain_start").disabled

    at.radio(key="retrain_kd").set_value("soft").run()  # distilling: Mixup/CutMix off, nothing refused
    assert at.number_input(key="retrain_mixup").disabled and not at.error
    at.number_input(key="retrain_epochs").set_value(1)
    at.selectbox(key="retrain_device").set_value("cpu")
    at.button(key="retrain_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    run = Path(at.session_state["retrain_start_run"])
    _stop(run)  # the spec is what is tested here, not the training
    over = read_json(run / "spec.json")["overrides"]
    assert (over["kd"], over["mixup"], over["cutmix"]) == ("soft", 0.0, 0.0)
    assert (over["augment"], over["auto_augment"], over["re_prob"]) == (True, DEIT_AA, 0.25)

    at.text_input(key="retrain_aa").set_value("rand-m9-zz").run()  # a policy timm would half-ignore
    assert any("Auto-augment policy 'rand-m9-zz' is not valid" in e.value for e in at.error)
    assert at.button(key="retrain_start").disabled


def _stop(run, timeout: float = 90.0) -> None:
    """End the job started in ``run`` (SIGTERM to its group once it runs) and wait until it has."""
    end = time.time() + timeout
    while time.time() < end:
        st = jobs.job_status(run)
        if st.pid and st.active:
            with contextlib.suppress(StudioError):
                jobs.cancel_job(run, force=True)
        elif st.pid and not st.active:
            return
        time.sleep(0.5)
    raise AssertionError(f"the job in {run} did not stop")
