"""Model families (issue 14): every supported timm ViT variant through every planning method, and every
unsupported one refused at load with one sentence — never a library's AttributeError or IndexError.

Random weights at 32 px, 3 blocks, so each case takes about a second.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch

from studio.analysis.criteria import CalibrationBatches
from studio.bench import profile
from studio.errors import StudioError
from studio.export import export_loaded, load_exported
from studio.families import FAMILIES, REFUSALS, UNITS, families_of, markdown_table, prunable_units
from studio.models import LoadedModel, create_vit, data_config, describe_base
from studio.prune import PruneRequest, load_methods, make_plan
from studio.prune.target import TOLERANCE
from studio.surgery import apply_plan, mask_model

PLANNERS = [n for n in load_methods().names() if load_methods().get(n).fn is not None]


def _loaded(family: str, num_classes: int = 5) -> LoadedModel:
    f = FAMILIES.get(family)
    arch, kw = f.example, {**f.build_kwargs(), "num_classes": num_classes}
    torch.manual_seed(0)
    m = create_vit(arch, **kw).eval()
    with torch.no_grad():  # some variants start with zero-init parts: give every unit a score of its own
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    names = [str(i) for i in range(num_classes)]
    return LoadedModel(m, describe_base(m, arch, kw), data_config(m), names, torch.device("cpu"))


def _batches(loaded: LoadedModel, n: int = 64) -> CalibrationBatches:
    g = torch.Generator().manual_seed(0)
    size = loaded.data_config["input_size"]
    ds = torch.utils.data.TensorDataset(
        torch.randn(n, *size, generator=g), torch.randint(0, 5, (n,), generator=g)
    )
    return CalibrationBatches(ds, 2, 32, 0, torch.device("cpu"))


def _params(name: str, family: str) -> dict:
    method = load_methods().get(name)
    budget = method.budgets[0]
    params = {budget.option: budget.default}
    if name == "sls":
        params["embed"] = "none"
    return params


@pytest.mark.parametrize("name", PLANNERS)
@pytest.mark.parametrize("family", FAMILIES.names())
def test_every_method_prunes_every_supported_family_exactly(family, name, tmp_path):
    loaded = _loaded(family)
    method = load_methods().get(name)
    params = _params(name, family)
    plan = make_plan(name, PruneRequest(loaded, params, _batches(loaded) if method.needs_data else []))
    budget = method.budgets[0]
    if budget.option == "target_macs":
        assert abs(plan.summary["macs_fraction"] / budget.default - 1) <= TOLERANCE + 0.02, plan.summary
    pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
    counted = profile(pruned, loaded.data_config["input_size"])
    assert counted["params"] == plan.summary["params_after"] and counted["macs"] == plan.summary["macs_after"]
    x = torch.randn(4, *loaded.data_config["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = pruned(x)
        if plan.depth == plan.base.depth and plan.embed is None:
            # masking (zeroed units on the full model) computes what the physical pruning computes
            torch.testing.assert_close(
                mask_model(copy.deepcopy(loaded.model), plan)(x), out, atol=1e-4, rtol=0
            )
    folder = export_loaded(pruned, loaded, tmp_path / "export", plan=plan)
    back = load_exported(folder, device="cpu").model
    with torch.inference_mode():
        assert torch.equal(back(x), out)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES.names())
def test_onnx_parity_for_every_family(family, tmp_path):
    from studio.export import export_onnx

    loaded = _loaded(family)
    plan = make_plan("magnitude", PruneRequest(loaded, {"target_macs": 0.5}))
    pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
    out = export_onnx(pruned, tmp_path / "m.onnx", loaded.data_config["input_size"])
    assert out["checked"] and out["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("case", REFUSALS.names())
def test_unsupported_families_are_refused_at_load_naming_the_module(case):
    refusal = REFUSALS.get(case)
    with pytest.raises(StudioError, match=refusal.says) as e:
        create_vit(refusal.example, **refusal.build_kwargs())
    assert "\n" not in str(e.value) and len(str(e.value)) < 500


@pytest.mark.parametrize("family", FAMILIES.names())
def test_each_family_detects_its_own_example_and_the_table_lists_it(family):
    loaded = _loaded(family)
    assert family in families_of(loaded.model)
    assert set(prunable_units(loaded.model)) <= set(UNITS)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = "\n".join("  " + line for line in markdown_table().splitlines())  # indented under its list item
    assert table in readme, "README's family table is stale: python -m studio.families"


TRAINING_JOBS = {  # one tiny job of each method that prunes while it trains
    "p3b": {"prune_ratio": 0.5, "epochs": 2, "steps_per_update": 1},
    "splora": {"rank": 2, "epochs": 1, "recovery_epochs": 1, "prune_step": 0.5, "target_density": 0.5},
}


def _job_spec(name: str, **params):
    from studio.data import DataSpec
    from studio.flows.prune import PruneSpec
    from studio.models import ModelSpec

    return PruneSpec(
        model=ModelSpec("demo", device="cpu"),
        method=name,
        params=load_methods().get(name).resolve({**TRAINING_JOBS[name], **params}),
        data=DataSpec("demo", limit=64),
        batch_size=32,
        bench=False,
        export=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAINING_JOBS))
@pytest.mark.parametrize("family", FAMILIES.names())
def test_training_methods_run_a_tiny_job_on_every_family(family, name, tmp_path):
    """P3B and SPLoRA on each family: the job prunes, its model matches the plan, its export reloads to the same
    logits (the export's own reload check, reload.json) and SPLoRA's masked model is the pruned one. A unit a
    method cannot mask exactly in a variant is refused before any work, in one sentence naming the fix; the run
    then prunes what it can (SPLoRA: the scope the Model page lists)."""
    import json

    from studio.flows import run_folder
    from studio.plan import PrunePlan
    from studio.prune import prunable_by_method
    from studio.runs import RunDir

    loaded, spec = _loaded(family, num_classes=10), _job_spec(name)
    method = load_methods().get(name)
    run = RunDir.create(tmp_path / "run", spec.to_dict())
    if method.refused_units(loaded.model):
        with pytest.raises(StudioError, match=r"(cannot (gate|mask)|built for).* another method"):
            run_folder(run, spec=spec, loaded=loaded)
        assert not run.plan_file.exists() and not any(run.path.glob("*.pt"))  # refused before any work
        can = prunable_by_method(loaded.model)[name]
        if name == "p3b":
            assert can == ()  # its gates prune every unit at once
        if not can:
            return
        spec = _job_spec(name, scope=",".join(can))
        run = RunDir.create(tmp_path / "scoped", spec.to_dict())
    run_folder(run, spec=spec, loaded=loaded)
    results = run.results()
    plan = PrunePlan.load(run.plan_file)
    assert not plan.is_dense and results["after"]["matches_plan"]
    assert results["after"]["params"] < results["before"]["params"]
    assert json.loads((run.export_dir / "reload.json").read_text())["max_abs_diff"] <= 1e-4
    if name == "splora":  # the masked adapters computed what the pruned model computes
        assert results["splora"]["series"]["splora"]["parity_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("family", FAMILIES.names())
def test_lora_adapters_cover_every_mlp_kind_and_fuse_into_a_prunable_model(family):
    """The Retrain page's LoRA: ``fc1`` means the MLP's input linears of every kind (fc1_g and fc1_x of a
    SwiGLU); the fused model is the adapted one and prunes like any other."""
    from studio.families import mlp_layout
    from studio.petl import TARGETS, LoRASpec, add_lora, fuse_lora

    loaded = _loaded(family)
    m = copy.deepcopy(loaded.model)
    names = set(add_lora(m, LoRASpec(rank=2, targets=TARGETS)))
    for i, blk in enumerate(loaded.model.blocks):
        inputs = {f"blocks.{i}.mlp.{a}" for a, _ in mlp_layout(blk.mlp).inputs(blk.mlp)}
        assert inputs <= names and {f"blocks.{i}.attn.qkv", f"blocks.{i}.mlp.fc2"} <= names
    with torch.no_grad():  # a non-zero update, so fusing has something to carry
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    x = torch.randn(2, *loaded.data_config["input_size"], generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        adapted = m(x)
        fused = fuse_lora(m).eval()
        torch.testing.assert_close(fused(x), adapted, atol=1e-5, rtol=0)
    plan = make_plan("magnitude", PruneRequest(loaded, {"target_macs": 0.6}))
    with torch.inference_mode():
        torch.testing.assert_close(
            mask_model(fused, plan)(x), apply_plan(copy.deepcopy(fused), plan)(x), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("scale_policy", ["keep", "reset"])
def test_qk_norm_head_dims_are_pruned_exactly_with_the_norms_over_the_kept_dims(scale_policy):
    """q_norm/k_norm are sliced to the kept head dims; the temperature fold goes into q_norm's affine weight
    (a norm undoes any scale of its input), so masked and pruned logits agree under either policy."""
    from studio.plan import BlockPlan, PrunePlan

    loaded = _loaded("qk-norm")
    base = loaded.base
    plan = PrunePlan(
        base,
        tuple(
            BlockPlan(i, heads=(0, 2) if i == 1 else None, head_dims=tuple(range(i, base.head_dim, 2)))
            for i in range(base.depth)
        ),
        scale_policy=scale_policy,
    )
    pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
    for blk, b in zip(pruned.blocks, plan.blocks, strict=True):
        assert blk.attn.q_norm.normalized_shape == (len(b.head_dims),) == blk.attn.k_norm.normalized_shape
    x = torch.randn(4, *loaded.data_config["input_size"], generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = pruned(x)
        torch.testing.assert_close(mask_model(copy.deepcopy(loaded.model), plan)(x), out, atol=1e-4, rtol=0)
        assert not torch.allclose(out, loaded.model(x), atol=1e-3)  # a real cut, not the dense function


def test_isomorphic_prunes_the_head_dims_of_a_qk_norm_model():
    loaded = _loaded("qk-norm")
    plan = make_plan(
        "isomorphic", PruneRequest(loaded, {"target_macs": 0.5, "head_dim_ratio": 0.5}, _batches(loaded))
    )
    assert any(b.head_dims is not None for b in plan.blocks), plan.blocks
    pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
    x = torch.randn(2, *loaded.data_config["input_size"], generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(
            mask_model(copy.deepcopy(loaded.model), plan)(x), pruned(x), atol=1e-4, rtol=0
        )


def test_every_timm_vit_loads_or_is_refused_with_a_studio_error():
    """Every one of timm's vit_*/deit*/eva*/beit* architectures (over 250): built (on the meta device: no memory)
    or refused with one StudioError sentence, never another exception type."""
    names = sorted({n for pattern in ("vit_*", "deit*", "eva*", "beit*") for n in timm.list_models(pattern)})
    loaded, refused = 0, 0
    for name in names:
        try:
            with torch.device("meta"):
                create_vit(name, num_classes=5)
            loaded += 1
        except StudioError as e:
            assert "\n" not in str(e) and len(str(e)) < 400, name
            refused += 1
    assert loaded + refused == len(names) >= 250 and loaded >= 0.8 * len(names), (loaded, refused)
