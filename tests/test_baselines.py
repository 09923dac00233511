"""Baselines (random / magnitude / taylor), the MACs-target solver, the method registry and the prune CLI."""

from __future__ import annotations

import copy
import json
from itertools import pairwise

import pytest
import torch
from safetensors.torch import save_file

from studio.bench import count_macs
from studio.cli import main
from studio.errors import StudioError
from studio.models import LoadedModel, create_vit, describe_base
from studio.plan import PrunePlan
from studio.prune import METHODS, Budget, Method, Option, PruneRequest, get_method, make_plan
from studio.surgery import apply_plan

ARCH = "vit_tiny_patch16_224"
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
BATCHES = [
    (torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.arange(8) % 5)
    for i in range(2)
]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    m = create_vit(ARCH, **KW).eval()
    return LoadedModel(
        model=m,
        base=describe_base(m, ARCH, KW),
        data_config={"input_size": [3, 32, 32]},
        class_names=list("abcde"),
        device=torch.device("cpu"),
    )


def plan_of(loaded, method, **params) -> PrunePlan:
    return make_plan(method, PruneRequest(loaded, params, BATCHES if method == "taylor" else ()))


def counted(loaded, plan):
    pruned = apply_plan(copy.deepcopy(loaded.model), plan)
    return count_macs(pruned, (3, 32, 32))["total"], sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("method", ["random", "magnitude", "taylor"])
@pytest.mark.parametrize(
    ("mode", "round_to", "scope"),
    [
        ("uniform", 1, "heads,mlp"),
        ("global", 1, "heads,mlp"),
        ("uniform", 8, "heads,mlp,embed"),
        ("global", 8, "heads,head_dims,mlp"),
    ],
)
def test_target_macs_lands_within_2_percent(loaded, method, mode, round_to, scope):
    plan = plan_of(loaded, method, target_macs=0.5, mode=mode, round_to=round_to, scope=scope)
    macs, params = counted(loaded, plan)
    base_macs = count_macs(loaded.model, (3, 32, 32))["total"]
    assert abs(macs / base_macs - 0.5) <= 0.5 * 0.02
    assert (macs, params) == (plan.summary["macs_after"], plan.summary["params_after"])
    assert plan.method == method and plan.params["solved"]["macs_fraction"] == pytest.approx(
        macs / base_macs, abs=1e-6
    )
    if round_to == 8:
        for b in plan.blocks:
            for idx in (b.mlp, b.head_dims):
                assert idx is None or len(idx) % 8 == 0
        assert plan.embed is None or len(plan.embed) % 8 == 0


@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_macs_and_params_fall_monotonically_with_ratio(loaded, mode):
    rows = [
        counted(loaded, plan_of(loaded, "magnitude", ratio=r, mode=mode, scope="heads,head_dims,mlp,embed"))
        for r in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    ]
    macs, params = zip(*rows)
    assert all(a > b for a, b in pairwise(macs)) and all(a > b for a, b in pairwise(params))


def test_ratio_one_never_empties_a_block(loaded):
    plan = plan_of(loaded, "random", ratio=1.0, scope="heads,head_dims,mlp,embed", mode="global")
    assert plan.depth == 3
    for b in plan.blocks:
        assert len(b.heads) == 1 and len(b.head_dims) == 1 and len(b.mlp) == 1


def test_magnitude_and_taylor_choose_by_their_criterion(loaded):
    model = copy.deepcopy(loaded.model)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight[16:32] *= 10  # q rows of head 1: large weights
        attn.proj.weight[:, 32:48] = 0  # head 2 writes nothing: zero Taylor score
    lm = LoadedModel(
        model=model,
        base=loaded.base,
        data_config=loaded.data_config,
        class_names=[],
        device=torch.device("cpu"),
    )
    mag = plan_of(lm, "magnitude", ratio=0.4, scope="heads")
    assert 1 in mag.blocks[0].heads and len(mag.blocks[0].heads) == 2
    tay = plan_of(lm, "taylor", ratio=0.4, scope="heads")
    assert 2 not in tay.blocks[0].heads and len(tay.blocks[0].heads) == 2


def test_registry_errors(loaded):
    with pytest.raises(StudioError, match=r"Valid pruning methods: .*magnitude.*random.*taylor"):
        get_method("magnitud")
    with pytest.raises(StudioError, match="no option 'alpha'"):
        plan_of(loaded, "random", ratio=0.5, alpha=1)
    with pytest.raises(StudioError, match="'norm' must be one of 1, 2"):
        plan_of(loaded, "magnitude", ratio=0.5, norm=3)
    with pytest.raises(StudioError, match="needs a budget"):
        plan_of(loaded, "random")
    with pytest.raises(StudioError, match="Unknown pruning scope 'neurons'"):
        plan_of(loaded, "random", ratio=0.5, scope="neurons")
    with pytest.raises(StudioError, match="smallest model these scopes allow"):
        plan_of(loaded, "random", target_macs=0.1, scope="heads")
    with pytest.raises(StudioError, match="needs calibration data"):
        make_plan("taylor", PruneRequest(loaded, {"ratio": 0.5}))


def _tiny_checkpoint(tmp_path, loaded) -> list[str]:
    save_file(loaded.model.state_dict(), str(tmp_path / "tiny.safetensors"))
    kw = {k: v for k, v in KW.items() if k not in ("img_size", "num_classes")}
    return [
        "--model",
        str(tmp_path / "tiny.safetensors"),
        "--arch",
        ARCH,
        "--img-size",
        "32",
        "--timm-kwargs",
        json.dumps(kw),
        "--device",
        "cpu",
    ]


def test_prune_cli_json_run_folder_and_replay(tmp_path, loaded, capsys):
    model_args = _tiny_checkpoint(tmp_path, loaded)
    out = tmp_path / "run1"
    rc = main(
        [
            "prune",
            "--method",
            "taylor",
            *model_args,
            "--data",
            "demo",
            "--limit",
            "40",
            "--target-macs",
            "0.5",
            "--round-to",
            "8",
            "--scope",
            "heads,mlp,embed",
            "--calib-batches",
            "2",
            "--batch-size",
            "16",
            "--bench-batch-sizes",
            "1",
            "8",
            "--bench-repeats",
            "2",
            "--out",
            str(out),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)  # exactly one JSON object
    assert captured.out.strip().count("\n") == 0
    assert {"spec.json", "plan.json", "results.json", "export"} <= {p.name for p in out.iterdir()}
    assert data["after"]["matches_plan"] and abs(data["summary"]["macs_fraction"] - 0.5) <= 0.01
    assert {"top1", "throughput"} <= set(data["before"]) and set(data["speedup"]) == {"1", "8"}
    assert (out / "export" / "model.safetensors").exists()

    rc = main(["apply", "--plan", str(out / "plan.json"), *model_args, "--json"])
    replay = json.loads(capsys.readouterr().out)
    assert rc == 0 and replay["matches_plan"] and replay["stored_summary_matches"]
    assert replay["macs"] == data["after"]["macs"]

    rc = main(
        [
            "export",
            "--plan",
            str(out / "plan.json"),
            *model_args,
            "--out",
            str(tmp_path / "x"),
            "--onnx",
            "--json",
        ]
    )
    exported = json.loads(capsys.readouterr().out)
    assert rc == 0 and exported["onnx"]["checked"] and exported["macs"] == data["after"]["macs"]

    rc = main(["plan", "diff", str(out / "plan.json"), str(out / "plan.json"), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["same"]
    rc = main(
        [
            "prune",
            "--method",
            "random",
            *model_args,
            "--norm",
            "1",
            "--ratio",
            "0.5",
            "--no-eval",
            "--no-bench",
            "--out",
            str(tmp_path / "run2"),
        ]
    )
    assert rc == 2 and "--norm is not an option of method 'random'" in capsys.readouterr().err


def test_a_registered_method_plugs_into_the_cli(tmp_path, loaded, capsys):
    def keep_first_heads(req, *, callbacks=(), cancel=None):
        n = int(req.params["heads_kept"])
        blocks = tuple(
            b.__class__(b.index, heads=tuple(range(n))) for b in PrunePlan.dense(req.loaded.base).blocks
        )
        return PrunePlan(req.loaded.base, blocks, method="first-heads", params=dict(req.params))

    METHODS.add(
        "test-first-heads",
        Method(
            "test-first-heads",
            keep_first_heads,
            "test only",
            options=(Option("heads_kept", int, 1, "heads kept per block"),),
            budgets=(Budget("heads_kept", "Heads kept per block", 1, 3, 1, 1),),
            rounds=False,
        ),
    )
    try:
        rc = main(
            [
                "prune",
                "--method",
                "test-first-heads",
                *_tiny_checkpoint(tmp_path, loaded),
                "--param",
                "heads_kept=2",
                "--no-eval",
                "--no-bench",
                "--out",
                str(tmp_path / "r"),
                "--json",
            ]
        )
        data = json.loads(capsys.readouterr().out)
        assert rc == 0 and data["params"]["heads_kept"] == 2
        assert PrunePlan.load(tmp_path / "r" / "plan.json").blocks[0].heads == (0, 1)
    finally:
        METHODS._items.pop("test-first-heads", None)


def test_deit_distilled_prunes_and_exports(tmp_path):
    from studio.export import export, load_exported

    arch = "deit_tiny_distilled_patch16_224"
    torch.manual_seed(0)
    m = create_vit(arch, **KW).eval()
    lm = LoadedModel(
        model=m,
        base=describe_base(m, arch, KW),
        data_config={"input_size": [3, 32, 32]},
        class_names=[],
        device=torch.device("cpu"),
    )
    plan = plan_of(lm, "taylor", target_macs=0.5, round_to=8, scope="heads,mlp,embed", mode="global")
    pruned = apply_plan(copy.deepcopy(m), plan)
    assert abs(count_macs(pruned, (3, 32, 32))["total"] / count_macs(m, (3, 32, 32))["total"] - 0.5) <= 0.01
    assert pruned.dist_token.shape[-1] == len(plan.embed) == pruned.head_dist.in_features
    export(pruned, lm.base, tmp_path / "e", plan=plan)
    again = load_exported(tmp_path / "e", device="cpu")
    x = BATCHES[0][0]
    with torch.inference_mode():
        assert torch.equal(again.model(x), pruned(x))
    assert again.plan == plan
