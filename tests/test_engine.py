"""The run engine's contracts: one spec form per kind, one flow per kind, one results shape, no import circles.

Parametrised over the registries (methods, flows), so a new entry is tested the moment it is registered.
"""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from studio.analysis.importance import ImportanceSpec
from studio.analysis.separability import SeparabilitySpec
from studio.bench import profile
from studio.data import DataSpec
from studio.flows import FLOWS, create_run, load_flows, run_folder, spec_from_dict
from studio.flows.benchmark import BenchmarkSpec
from studio.flows.prune import PruneSpec
from studio.flows.retrain import RecoverySpec
from studio.flows.sls import SLSRunSpec
from studio.models import ModelSpec
from studio.prune import PruneRequest, load_methods, make_plan
from studio.runs import RunDir
from studio.surgery import apply_plan

ROOT = Path(__file__).resolve().parent.parent
COMMON_KEYS = {"kind", "method", "plan", "summary", "params", "before", "after", "speedup", "ideal_speedup"}
COMMON_KEYS |= {"export", "onnx", "device", "seconds", "peak_memory_mb"}
DATA = DataSpec("demo", limit=96)

# Tiny settings per method for a run from the Prune page (widget key suffix -> value).
TINY_OPTIONS = {
    "p3b": {"epochs": 4, "probe": "mean", "steps_per_update": 2},
    "splora": {"epochs": 1, "recovery_epochs": 0, "prune_step": 0.5, "score_batches": 1, "rank": 2.0},
    "sls": {"embed": "none"},
}
DEPTH_ONLY = {
    "sls"
}  # cuts whole blocks by separability: it scores no units, so it has no removed-score signal


def _methods() -> list[str]:
    return load_methods().names()


# --------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", [n for n in _methods() if load_methods().get(n).fn is not None])
def test_every_planning_method_gives_a_plan_the_surgery_applies_at_its_analytic_cost(name, demo_loaded):
    method = load_methods().get(name)
    budget = method.budgets[0]
    params = {budget.option: budget.default}
    from studio.analysis.criteria import calibration_batches

    batches = calibration_batches(demo_loaded, DATA, "train", 2, 48) if method.needs_data else []
    plan = make_plan(name, PruneRequest(demo_loaded, params, batches))
    pruned = apply_plan(__import__("copy").deepcopy(demo_loaded.model), plan.validate()).eval()
    counted = profile(pruned, demo_loaded.data_config["input_size"])
    assert counted["params"] == plan.summary["params_after"] and counted["macs"] == plan.summary["macs_after"]
    assert plan.summary["macs_after"] < plan.summary["macs_before"], "the default budget prunes something"
    # the "criterion score removed" signal (Compare ranks plans by it): every unit-scoring method records it
    score = plan.summary.get("removed_score")
    if name in DEPTH_ONLY:
        assert score is None
    else:
        assert score is not None and 0.0 < score < 1.0, score


@pytest.mark.parametrize("name", _methods())
def test_every_method_declares_budgets_that_are_its_options(name):
    """A method that trains names a registered flow that takes the Prune page's spec; one that plans has a
    plan function; either way its budgets are options the CLI and the page can set."""
    m = load_methods().get(name)
    own = {o.name for o in m.accepted}
    assert m.budgets and all(b.option in own for b in m.budgets)
    assert m.flow in FLOWS and FLOWS.get(m.flow).spec_type is PruneSpec
    assert (m.fn is None) == m.trains == FLOWS.get(m.flow).trains


def _wait_done(run: Path, timeout: float = 600) -> str:
    from studio import jobs

    t0 = time.time()
    while time.time() - t0 < timeout:
        st = jobs.job_status(run)
        if st.state in jobs.FINAL_STATES:
            return st.state
        time.sleep(0.5)
    raise AssertionError(f"job {run} did not finish in {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("name", _methods())
def test_the_prune_page_starts_every_registered_method(name, monkeypatch, tmp_path):
    """Each method, started from the Prune page with its declared budget, runs to results of the common shape."""
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("STUDIO_LOCK_DIR", str(tmp_path / "locks"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.session_state["studio_data_spec"] = DATA
    at.run()
    at.switch_page("pages/6_prune.py").run()
    at.selectbox(key="prune_method").set_value(name).run()
    method = load_methods().get(name)
    for opt, value in TINY_OPTIONS.get(name, {}).items():
        key = f"prune_opt_{name}_{opt}"
        widget = next(w for w in [*at.number_input, *at.selectbox, *at.text_input] if w.key == key)
        widget.set_value(value)
    at.checkbox(key="prune_bench").uncheck()
    at.run()
    assert not at.exception and not at.error, (name, [e.value for e in at.error])
    key = "prune_job" if method.trains else "prune_run"
    buttons = {b.key: b for b in at.button}
    assert key in buttons and not buttons[key].disabled, f"the Prune page cannot start {name}"
    buttons[key].click().run()
    assert not at.exception and not at.error, (name, [e.value for e in at.error])
    if method.trains:
        run = Path(at.session_state["prune_job_run"])
        assert _wait_done(run) == "done", (run / "stderr.log").read_text()[-3000:]
    else:
        run = Path(at.session_state["prune_last"]["run"])
    res = json.loads((run / "results.json").read_text())
    assert set(res) >= COMMON_KEYS and res["kind"] == method.flow and res["method"] == name
    assert res["after"]["matches_plan"] is True and res["kind"] in res


def test_a_page_shows_a_bad_combination_beside_the_button(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.session_state["studio_data_spec"] = DATA
    at.run()
    at.switch_page("pages/6_prune.py").run()
    at.selectbox(key="prune_method").set_value("p3b").run()
    next(w for w in at.number_input if w.key == "prune_opt_p3b_epochs").set_value(-3).run()
    assert any("epochs" in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="prune_job").disabled
    runs = tmp_path / "runs"  # no run folder for a refused start (the session's .workspaces/ is not a run)
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


# ----------------------------------------------------------------------------------------- every flow
def _example(kind: str, tmp: Path) -> object:
    """A tiny spec of each flow kind (CPU, seconds)."""
    demo = ModelSpec("demo", device="cpu")
    if kind == "prune":
        return PruneSpec(demo, "magnitude", {"target_macs": 0.5}, DATA, bench=False)
    if kind == "p3b":
        return PruneSpec(demo, "p3b", {**TINY_OPTIONS["p3b"], "prune_ratio": 0.5}, DATA, bench=False)
    if kind == "splora":
        return PruneSpec(demo, "splora", {**TINY_OPTIONS["splora"], "target_density": 0.5}, DATA, bench=False)
    if kind == "sls":
        return SLSRunSpec(model=demo, data=DATA, keep=4, retrain="cpu", epochs=1, bench=False)
    if kind == "retrain":
        src = create_run(PruneSpec(demo, "magnitude", {"target_macs": 0.5}, DATA, bench=False), tmp / "src")
        run_folder(src)
        return RecoverySpec(ModelSpec(str(src.export_dir), device="cpu"), DATA, demo, overrides={"epochs": 1})
    if kind == "separability":
        return SeparabilitySpec(demo, DATA, samples=48, embed="pca")
    if kind == "benchmark":
        return BenchmarkSpec((("dense", demo),), batch_sizes=(2,), warmup=1, repeats=2, rounds=1)
    if kind == "importance":
        return ImportanceSpec(demo, DATA, criteria=("l1", "taylor", "ablation"), batches=1, batch_size=16)
    if kind == "sensitivity":
        from studio.flows.sensitivity import SensitivitySpec

        return SensitivitySpec(demo, DataSpec("demo", limit=96), fractions=(0.5, 0.75))
    raise AssertionError(f"flow '{kind}' has no example spec here: add one so it is tested")


def _figures(res: dict) -> dict:
    """What must replay exactly (timings and paths aside)."""
    keep = ("params", "macs", "top1", "loss", "n", "matches_plan")
    out = {
        "plan": res["plan"],
        "before": {k: res["before"].get(k) for k in keep},
        "after": {k: res["after"].get(k) for k in keep},
    }
    if res["kind"] == "separability":  # an analysis: its figures are the per-layer scores and the cut
        out["layers"], out["keep"] = res["separability"]["layers"], res["separability"]["keep"]
    if res["kind"] == "sensitivity":  # an analysis: its figures are the sweep's rows
        out["rows"] = res["sensitivity"]["rows"]
    if res["kind"] == "importance":  # an analysis: its figures are the scores
        scores = res["importance"]["scores"]
        out["scores"] = {c: {k: v for k, v in s.items() if k != "seconds"} for c, s in scores.items()}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(load_flows().names()))
def test_every_flow_round_trips_its_spec_and_replays_exactly_from_spec_json(kind, tmp_path, capsys):
    from studio.cli import main

    spec = _example(kind, tmp_path)
    assert spec.kind == kind
    assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    first = create_run(spec, tmp_path / "first")
    assert main(["run", str(first.path), "--json"]) == 0
    capsys.readouterr()
    assert main(["run", "--spec", str(first.spec_file), "--out", str(tmp_path / "again"), "--json"]) == 0
    replay = json.loads(capsys.readouterr().out)
    original = RunDir(first.path).results()
    assert set(original) >= COMMON_KEYS and original["kind"] == kind and kind in original
    assert _figures(replay) == _figures(original)


# ------------------------------------------------------------------------------------------- structure
def _imports() -> dict[str, set[str]]:
    """module -> studio modules it imports (ast; relative imports resolved)."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "studio").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        pkg = mod if rel.name == "__init__" else mod.rpartition(".")[0]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([base] if base else [])])
                if base.startswith("studio"):
                    out.add(base)
                    out.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("studio"))
        graph[mod] = out
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_the_engine_has_no_import_circles():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):  # a package's own submodules (its face re-exports them)
                continue
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(d) :], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers_read_top_down():
    graph = _imports()
    upper = ("studio.prune", "studio.flows", "studio.jobs", "studio.workflow", "studio.ui", "studio.commands")
    for m, deps in graph.items():
        if m.startswith("studio.analysis"):
            bad = sorted(d for d in deps if d.startswith(upper))
            assert not bad, f"{m} imports {bad}: analysis sits below methods, flows and jobs"
        if m.startswith("studio.prune"):
            bad = sorted(d for d in deps if d.startswith(upper[1:]))
            assert not bad, f"{m} imports {bad}: methods sit below flows and jobs"
        if not m.startswith("studio.ui"):
            path = ROOT / (m.replace(".", "/") + ".py")
            path = path if path.exists() else ROOT / m.replace(".", "/") / "__init__.py"
            assert "import streamlit" not in path.read_text(), f"{m}: the engine never imports streamlit"


ARGV_BUILDERS = re.compile(
    r'\[\s*"(prune|retrain|analyze|export)"\s*,|"--out"\s*,\s*str\(|argv\s*\+=|argv_for'
)


def test_no_page_or_engine_module_builds_a_cli_argv():
    """Specs go to jobs as spec.json; only the CLI's own parser reads argv."""
    files = [*(ROOT / "pages").glob("*.py"), *(ROOT / "studio").rglob("*.py"), ROOT / "app.py"]
    offenders = [
        f"{p.relative_to(ROOT)}: {m.group(0)}"
        for p in files
        if p.name != "cli.py"
        for m in ARGV_BUILDERS.finditer(p.read_text())
    ]
    assert not offenders, offenders


def test_counting_macs_never_runs_the_shared_model(demo_loaded):
    """MACs are counted on a copy: the cached model's own modules never run with attention flipped to unfused
    (two sessions share it; one timing it while another counted would time the slow path)."""
    from studio.bench import count_macs

    seen: list[bool] = []
    originals = {id(b.attn) for b in demo_loaded.model.blocks}
    hooks = [
        b.attn.register_forward_pre_hook(lambda m, _: seen.append(id(m) in originals))
        for b in demo_loaded.model.blocks
    ]
    try:
        count_macs(demo_loaded.model, demo_loaded.data_config["input_size"])
    finally:
        for h in hooks:
            h.remove()
    assert seen and not any(seen), "count_macs ran the shared model's own attention modules"


def _state(loaded) -> tuple[list, dict, bool, bool]:
    m = loaded.model
    flags = [getattr(mod, "fused_attn", None) for mod in m.modules() if hasattr(mod, "fused_attn")]
    return flags, m.state_dict(), m.training, any(p.grad is not None for p in m.parameters())


def test_two_sessions_benchmark_and_importance_leave_the_cached_model_as_loaded(monkeypatch, tmp_path):
    """A Benchmark run and an Importance run, interleaved in two sessions on the one server process, leave the
    shared cached model's attention flags, weights, mode and gradients exactly as a fresh load has them."""
    from studio.load import load_model
    from studio.ui.state import _load_cached

    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    a = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    b = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    for at in (a, b):
        at.session_state["studio_data_spec"] = DATA
        at.run()
    a.switch_page("pages/9_benchmark.py").run()
    b.switch_page("pages/4_importance.py").run()  # scores every default criterion (SAViT's gates, ablation)
    a.number_input(key="bench_repeats").set_value(2)
    a.number_input(key="bench_warmup").set_value(1)
    a.multiselect(key="bench_sizes").set_value([1, 4])
    a.button(key="bench_run").click().run()
    b.slider(key="imp_target").set_value(0.6).run()  # plans SAViT at another budget
    for at in (a, b):
        assert not at.exception and not at.error, [e.value for e in at.error]
    spec = ModelSpec("demo")
    cached = _load_cached(repr(spec.to_dict()), spec)
    flags, weights, training, grads = _state(cached)
    fresh_flags, fresh_weights, fresh_training, _ = _state(load_model(spec))
    assert flags == fresh_flags and training == fresh_training and not grads
    assert weights.keys() == fresh_weights.keys()
    assert all(torch.equal(weights[k], fresh_weights[k]) for k in weights)


@pytest.mark.parametrize(
    ("name", "params", "says"),
    [
        ("p3b", {"epochs": 4, "start_epoch": 0, "finalize_epoch": 0}, "finalize epoch"),
        ("splora", {"prune_step": 2.0}, "--prune-step"),
        ("isomorphic", {"head_ratio": 1.5}, "--head-ratio"),
        ("magnitude", {"target_macs": 0.5, "round_to": 0}, "round_to"),
    ],
)
def test_a_spec_the_method_would_refuse_is_refused_before_any_job(name, params, says):
    from studio.errors import StudioError

    spec = PruneSpec(ModelSpec("demo"), name, params, DATA)
    with pytest.raises(StudioError, match=re.escape(says)):
        spec.validate()


def test_count_budgets_are_bounded_by_the_model_depth():
    sls = load_methods().get("sls")
    keep = next(b for b in sls.budgets if b.option == "keep_blocks")
    assert keep.whole and keep.bounds(12) == (1, 12.0, 6) and keep.bounds(4)[1:] == (4.0, 4)
