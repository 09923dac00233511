"""Export: download a pruned model (safetensors + manifest), its ONNX graph, plan, model card and CLI command."""

import json
from pathlib import Path

import streamlit as st

from studio.compare import collect, label
from studio.export import read_manifest
from studio.modelcard import export_zip, lineage, lineage_command, lineage_specs, model_card
from studio.runs import RunDir
from studio.ui import cached, checks, guide, shape, state
from studio.ui.charts import human, pct
from studio.workflow import export_onnx_for, export_plan_run

st.title("Export")
st.caption(
    "An export is `model.safetensors` + `manifest.json` (base architecture, the plan, data config, classes, "
    "metrics, versions). Loading rebuilds the base, applies the plan and loads the weights: no pickle anywhere."
)

with state.user_errors():
    plan = state.active_plan()
    source = state.active_plan_source()  # the run whose trained model the active plan is, if any
    trained = source is not None and (RunDir(source).export_dir / "manifest.json").exists()
    if plan is not None:
        c1, c2 = st.columns([3, 1])
        c1.markdown(
            f"Active plan: **{plan.method}**, {plan.depth}/{plan.base.depth} blocks"
            + (
                f", the structure of run `{source.name}` (its trained weights are exported)."
                if trained
                else "."
            )
        )
        if c2.button("Export the active plan", key="export_active", icon=":material/ios_share:"):
            if trained:  # the run's own export holds the trained (retrained, fine-tuned) weights: never the
                # plan applied to the untrained current model
                st.session_state["export_run"] = str(source)
            else:
                bar = state.StreamlitProgress("Exporting")
                run = export_plan_run(
                    state.pristine_model(), plan, root=state.runs_root(), model_spec=state.model_spec()
                )
                bar.done()
                st.session_state["export_run"] = str(run.path)  # select it below

    def exported(model: str | None) -> list[dict]:
        return [r for r in collect(state.runs_root(), model=model) if r["has_export"]]

    wanted = st.session_state.get("export_run")
    current = exported(state.model_spec().source)
    if wanted and wanted not in {r["path"] for r in current}:
        st.session_state["export_all_models"] = True  # the run picked elsewhere was made from another model
    every = st.toggle("Runs of every model (not only the current one)", key="export_all_models")
    rows = exported(None) if every else current
    if not rows:
        guide.needs(
            "Nothing exported yet: prune the model first (or export the active plan above).",
            "pages/6_prune.py",
            "Prune",
        )
        st.stop()
    names = {r["path"]: f"{label(r)} · {r['run']}" for r in rows}
    if st.session_state.get("export_run") not in names:
        st.session_state.pop("export_run", None)  # a run of another model, or deleted
    pick = st.selectbox("Model to export", list(names), format_func=names.get, key="export_run")
    run = RunDir(pick)
    # every element below is keyed by the run: a chart or a download keyed alike across runs keeps showing the
    # run picked before (the browser walk caught the shape and the zip of the previous run after a switch)
    manifest = read_manifest(run.export_dir)
    spec, results = run.spec(), run.results() or {}
    metrics = results.get("after") or manifest.get("metrics") or {}
    k = st.columns(4)
    k[0].metric("Params", human(metrics.get("params")))
    k[1].metric("MACs / image", human(metrics.get("macs")))
    k[2].metric("Test accuracy", pct(metrics.get("top1")))
    k[3].metric("Weights", f"{(run.export_dir / 'model.safetensors').stat().st_size / 2**20:.1f} MB")
    with st.expander("Shape: the widths this model keeps, per block", expanded=True):
        shape.show_shape(
            manifest.get("plan"), key=f"export_shape_{run.path.name}", name=f"{run.path.name}-shape"
        )

    # the whole lineage (e.g. prune -> retrain), each step replayed from the one before, paths relative to the
    # folder that holds the runs folder; the specs ship in the zip's lineage/ folder
    steps = lineage_specs(lineage(run.path), root=state.runs_root())
    command = lineage_command(steps)
    made_by = next(
        (s for _, s, _ in steps if s.get("kind") != "retrain"), spec
    )  # the step that chose the plan
    card = model_card(manifest, name=run.path.name, spec=made_by, results=results, command=command)
    plan_json = json.dumps(manifest["plan"], indent=1) if manifest.get("plan") else None

    st.subheader("Downloads", divider="gray")
    d = st.columns(3)
    extra = {"README.md": card, "spec.json": json.dumps(spec, indent=1)}
    extra |= {name: json.dumps(step, indent=1) for name, step, _ in steps}
    extra |= {"plan.json": plan_json} if plan_json else {}
    with_onnx = (run.export_dir / "model.onnx").is_file()
    d[0].download_button(
        "Model (zip: safetensors + manifest + card" + (" + ONNX)" if with_onnx else ")"),
        export_zip(run.export_dir, extra),
        f"{run.path.name}.zip",
        "application/zip",
        key=f"export_zip_{run.path.name}",
        type="primary",
        icon=":material/download:",
    )
    d[1].download_button(
        "Model card (markdown)",
        card,
        "README.md",
        "text/markdown",
        key=f"export_card_{run.path.name}",
        icon=":material/description:",
    )
    if plan_json:
        d[2].download_button(
            "Plan (JSON)",
            plan_json,
            "plan.json",
            "application/json",
            key=f"export_plan_{run.path.name}",
            icon=":material/account_tree:",
        )

    st.subheader("ONNX", divider="gray")
    onnx_file, onnx_check = run.export_dir / "model.onnx", run.export_dir / "onnx.json"
    if st.button(
        "Export ONNX and check parity",
        key=f"export_onnx_{run.path.name}",
        icon=":material/swap_horiz:",
        disabled=onnx_file.exists(),
    ):
        with st.spinner("Tracing and checking with onnxruntime…"):
            export_onnx_for(run.export_dir, cached.run_model(run.export_dir))
        st.rerun()  # the zip above was built before the graph existed: build it again, with model.onnx
    if onnx_file.exists():
        parity = json.loads(onnx_check.read_text()) if onnx_check.exists() else {}
        if parity.get("checked"):
            st.success(
                f"ONNX matches PyTorch: max |logit difference| {parity['max_abs_diff']:.2e} "
                "(onnxruntime, CPU, random inputs).",
                icon=":material/check_circle:",
            )
        else:
            st.info("ONNX written; onnxruntime is not installed, so its parity was not checked.")
        st.download_button(
            "model.onnx",
            onnx_file.read_bytes(),
            "model.onnx",
            "application/octet-stream",
            key=f"export_onnx_file_{run.path.name}",
            icon=":material/download:",
        )

    st.subheader("Checked on", divider="gray")
    st.dataframe(
        checks.backend_checks(run.export_dir, state.runs_root()),
        hide_index=True,
        key=f"export_checks_{run.path.name}",
    )

    st.subheader("Load it, reproduce it", divider="gray")
    st.code(
        f'from studio.export import load_exported\nmodel = load_exported("{Path(run.export_dir)}").model',
        language="python",
    )
    st.code(command, language="bash")
    with st.expander("Model card preview"):
        st.markdown(card)
