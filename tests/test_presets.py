"""Paper presets: every value has a source, the docs table equals the code, every studio deviation says why,
and the CLI / spec pick a preset and report which one is active."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.cli import build_parser
from studio.commands.prune import spec_of
from studio.errors import StudioError
from studio.flows.prune import PruneSpec
from studio.models import ModelSpec
from studio.prune import get_method, load_methods
from studio.prune.presets import (
    CPU,
    PRESETS,
    RUN_FIELDS,
    active_preset,
    apply_preset,
    get_preset,
    markdown,
    preset_names,
    studio_default,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "results" / "presets.md"


def test_the_docs_table_is_generated_from_the_code():
    assert DOC.read_text(encoding="utf-8") == markdown(), (
        "docs/results/presets.md is stale: python -m studio.prune.presets > docs/results/presets.md"
    )


def test_the_table_lists_every_preset_value_with_its_source():
    text = markdown()
    for preset in PRESETS.values():
        section = text.split(f"## {preset.name}\n", 1)[1].split("\n## ", 1)[0]
        for key, s in [*preset.options.items(), *(("run." + k, v) for k, v in preset.run.items())]:
            shown = "–" if s.value is None else f"`{s.value}`"
            assert f"| {key} | {shown} | {s.source} |" in section, (preset.name, key)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_for_its_method_and_sourced(name):
    preset = PRESETS[name]
    assert name == f"paper:{preset.method}" and preset.method in load_methods()
    method = get_method(preset.method)
    params = method.resolve(preset.values())  # every option exists and passes the method's own checks
    assert all(params[k] == v for k, v in preset.values().items())
    assert set(preset.run) <= set(RUN_FIELDS)
    for key, s in [*preset.options.items(), *preset.run.items()]:
        assert len(s.source) > 15 and any(c.isalpha() for c in s.source), (name, key)
    spec = PruneSpec(ModelSpec(), preset.method, params, **preset.run_values(), preset=name)
    assert spec.to_dict()["preset"] == name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_studio_deviation_from_the_paper_says_why(name):
    preset = PRESETS[name]
    keys = [*preset.options, *preset.run]
    values = {**preset.values(), **preset.run_values()}
    differ = {k for k in keys if studio_default(preset.method, k) != values[k]}
    assert differ == set(preset.cpu_reasons), "a reason for each difference, and only for differences"


def test_presets_resolve_and_given_values_win():
    params, run = apply_preset("paper", "isomorphic", {"round_to": 8, "importance": None})
    assert params["round_to"] == 8 and params["scale_policy"] == "reset" and params["importance"] == "taylor"
    assert run == {"calib_batches": 50, "batch_size": 64, "calib_split": "train"}
    assert apply_preset(CPU, "isomorphic", {"ratio": 0.3}) == ({"ratio": 0.3}, {})
    assert get_preset("paper:savit", "savit") is PRESETS["paper:savit"]
    with pytest.raises(StudioError, match="is for method 'savit'"):
        get_preset("paper:savit", "isomorphic")
    with pytest.raises(StudioError, match="unknown for method 'magnitude'"):
        get_preset("paper", "magnitude")  # a baseline has no paper
    assert preset_names("magnitude") == [CPU]
    with pytest.raises(StudioError, match="is for method"):
        PruneSpec(ModelSpec(), "isomorphic", {"ratio": 0.5}, preset="paper:sls").validate()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_active_preset_is_told_from_the_settings(name):
    preset = PRESETS[name]
    m = preset.method
    assert active_preset(m, preset.values(), preset.run_values()) == name
    assert active_preset(m, {}, {}) == CPU
    budget = get_method(m).budgets[0]
    assert active_preset(m, {budget.option: budget.default}, {}) == CPU  # the budget is always the user's
    # one value moved back to the studio's (one the method's checks accept alone): not the paper's any more
    moved = 0
    for key in (k for k in preset.cpu_reasons if k in preset.options and studio_default(m, k) is not None):
        changed = {**preset.values(), key: studio_default(m, key)}
        try:
            get_method(m).resolve(changed)
        except StudioError:
            continue
        assert active_preset(m, changed, preset.run_values()) in (CPU, "custom"), key
        moved += 1
    assert moved
    other = {**preset.values(), budget.option: budget.low} if budget.option in preset.options else None
    if other is not None and other != preset.values():
        assert active_preset(m, other, preset.run_values()) == "custom"  # the paper's, but another budget


def test_cli_prune_preset_builds_the_papers_spec_and_flags_win():
    parse = build_parser().parse_args
    spec = spec_of(parse(["prune", "--method", "isomorphic", "--preset", "paper", "--model", "demo"]))
    assert spec.preset == "paper" and spec.calib_batches == 50 and spec.batch_size == 64
    assert spec.params["round_to"] == 2 and spec.params["scale_policy"] == "reset"
    assert (spec.params["ratio"], spec.params["head_ratio"], spec.params["head_dim_ratio"]) == (
        0.5,
        0.5,
        0.25,
    )
    assert active_preset(spec.method, spec.params, spec.to_dict()) == "paper:isomorphic"
    spec = spec_of(
        parse(["prune", "--method", "isomorphic", "--preset", "paper", "--round-to", "8", "--model", "demo"])
    )
    assert spec.params["round_to"] == 8 and spec.params["scale_policy"] == "reset"
    assert active_preset(spec.method, spec.params, spec.to_dict()) == "custom"
    spec = spec_of(parse(["prune", "--method", "savit", "--preset", "paper:savit", "--model", "demo"]))
    assert spec.batch_size == 32 and spec.batches == 4000 and spec.params["flops_tol"] == 1e-4
    plain = spec_of(parse(["prune", "--method", "isomorphic", "--ratio", "0.3", "--model", "demo"]))
    assert plain.preset is None and plain.calib_batches is None and plain.batches == 8
    assert active_preset(plain.method, plain.params, plain.to_dict()) == CPU
