"""Benchmark: measured throughput and latency of several models, with the ideal (MACs) speed-up beside it."""

import streamlit as st

from studio.backends import BACKENDS
from studio.benchmark import dtypes_for
from studio.compare import collect, label
from studio.flows import start
from studio.ui import benchmark as vm
from studio.ui import charts, guide, state
from studio.ui.charts import COLORS
from studio.ui.sidebar import model_label

st.title("Benchmark")
st.caption(
    "Every model is timed in this server process on the current device, the models taking turns over three "
    "rounds (median): warm-up, device synchronisation, inference mode, fixed shapes. The ideal speed-up is the "
    "ratio of MACs; the measured one is what the hardware gives, on each deployment backend (PyTorch eager, "
    "torch.compile, ONNX Runtime), and the efficiency is measured / ideal. The gap comes from memory traffic, "
    "kernel launch overheads and widths that are not multiples of 8."
)

with state.user_errors():
    loaded = state.pristine_model()
    current = state.model_spec().source
    runs = [r for r in collect(state.runs_root(), model=current) if r["has_export"]]
    options = {vm.DENSE: f"dense: {model_label(current)}"}
    options |= {r["path"]: label(r) for r in runs}
    if not runs:
        guide.needs(
            "No pruned model of this model yet: prune one to compare it.", "pages/6_prune.py", "Prune"
        )
    c1, c2, c3 = st.columns([3, 2, 2])
    picked = c1.multiselect(
        "Models", list(options), default=list(options)[:3], format_func=options.get, key="bench_models"
    )
    sizes = c2.multiselect("Batch sizes", [1, 8, 16, 32, 64, 128, 256], [1, 64], key="bench_sizes")
    dtypes = c3.multiselect("Dtypes", dtypes_for(loaded.device), ["float32"], key="bench_dtypes")
    c1, c2, c3 = st.columns([1, 1, 4])
    warmup = c1.number_input("Warm-up passes", 1, 200, 5, key="bench_warmup")
    repeats = c2.number_input("Timed passes", 3, 500, 20, key="bench_repeats")
    backends = c3.multiselect(
        "Backends",
        BACKENDS.names(),
        ["eager"],
        format_func=lambda b: f"{b}: {BACKENDS.get(b).summary}",
        key="bench_backends",
        help="Each model is prepared once per backend and batch size (an ONNX export; torch.compile compiles, "
        "tens of seconds per model) and then timed. ONNX Runtime times float32 only.",
    )

    spec = vm.benchmark_spec(
        state.model_spec(),
        {p: options[p] for p in picked},
        sizes,
        dtypes,
        backends=backends,
        warmup=warmup,
        repeats=repeats,
    )
    problem = state.problem_of(spec)  # a bad choice is said here, before anything is timed
    if problem:
        st.error(problem, icon=":material/error:")
    if st.button(
        "Run benchmark",
        type="primary",
        key="bench_run",
        icon=":material/speed:",
        disabled=problem is not None,
    ):
        bar = state.StreamlitProgress("Measuring")
        run, _ = start(spec, root=state.runs_root(), loaded=loaded, callbacks=[bar])
        bar.done()
        st.session_state["bench_last_run"] = str(run.path)

    # this session's last benchmark, else (a reload, a new tab) the newest one of this model: nothing is lost
    shown = vm.last_benchmark(state.runs_root(), current, st.session_state.get("bench_last_run"))
    rows = None if shown is None else shown.results()["benchmark"]["rows"]
    if shown is not None and str(shown.path) != st.session_state.get("bench_last_run"):
        st.caption(f"The last benchmark of this model, `{shown.path.name}`; run again to measure anew.")
    if rows:
        df = vm.rows_frame(rows)
        skipped = shown.results()["benchmark"].get("skipped") or []
        if skipped:
            st.caption("Not timed: " + ", ".join(f"{s['backend']} in {s['dtype']}" for s in skipped) + ".")
        st.subheader("Speed-up: measured per backend vs ideal", divider="gray")
        c1, c2 = st.columns(2)
        bs = c1.selectbox("Batch size", sorted(df["batch_size"].unique()), key="bench_show_bs")
        dt = c2.selectbox("Dtype", list(df["dtype"].unique()), key="bench_show_dtype")
        sel = df[(df["batch_size"] == bs) & (df["dtype"] == dt)]
        long = vm.speedup_bars(sel)
        fig = charts.bar(
            long,
            x="model",
            y="factor",
            color="series",
            colors={"ideal (MACs)": COLORS["muted"], "measured · eager": COLORS["recovered"]},
            custom_data=["images_per_s", "efficiency", "macs"],
            hovertemplate=charts.hover(
                "%{x}",
                speed_up="×%{y:.2f}",
                images_per_s="%{customdata[0]:.1f}",
                efficiency="%{customdata[1]:.0%}",
                MACs="%{customdata[2]:,}",
            ),
            y_title=f"× vs {sel['model'].iloc[0] if len(sel) else 'reference'}",
        )
        fig.add_hline(y=1, line_dash="dot", line_color=COLORS["dense"])
        charts.show(fig, sel, key="bench_speedup", name="speedup")

        st.subheader("Throughput and latency by batch size", divider="gray")
        c1, c2 = st.columns(2)
        with c1:
            fig = charts.line(
                df,
                x="batch_size",
                y="images_per_s",
                color="model",
                line_dash="setting",
                log_x=True,
                title="Images per second",
                hovertemplate=charts.hover("batch %{x}", images_per_s="%{y:.1f}"),
            )
            charts.show(fig, key="bench_tp")
        with c2:
            fig = charts.line(
                df,
                x="batch_size",
                y="latency_ms",
                color="model",
                line_dash="setting",
                log_x=True,
                log_y=True,
                title="Latency per batch (ms, median)",
                hovertemplate=charts.hover("batch %{x}", latency_ms="%{y:.2f}"),
            )
            charts.show(fig, key="bench_latency")
        st.dataframe(
            df,
            hide_index=True,
            key="bench_table",
            column_config={
                "images_per_s": st.column_config.NumberColumn("images/s", format="%.1f"),
                "latency_ms": st.column_config.NumberColumn("latency ms", format="%.2f"),
                "latency_ms_p90": st.column_config.NumberColumn("p90 ms", format="%.2f"),
                "ideal_speedup": st.column_config.NumberColumn("ideal ×", format="%.2f"),
                "measured_speedup": st.column_config.NumberColumn("measured ×", format="%.2f"),
                "efficiency": st.column_config.NumberColumn("efficiency", format="percent"),
            },
        )
        charts.download_csv(df, "benchmark", key="bench_csv")
guide.next_step(("pages/10_compare.py", "compare accuracy against speed"), ("pages/11_export.py", "export"))
