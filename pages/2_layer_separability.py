"""Layer separability (SLS): per-layer CLS separability, the α depth cut, then prune + retrain the cut."""

import streamlit as st

from studio import jobs
from studio.analysis.separability import EMBEDDINGS, SeparabilitySpec
from studio.analysis.sls_cut import sls_cut
from studio.flows import start
from studio.flows.sls import SLSRunSpec
from studio.prune.sls import TRAINABLE, preview_cut
from studio.runs import RunDir
from studio.ui import cached, charts, guide, state
from studio.ui import jobs as ui_jobs
from studio.ui import sls as ui
from studio.ui.charts import human

st.title("Layer separability")
st.caption(
    "SLS (Han & Tang, ECCV 2024): how well each layer's CLS token separates the classes — a t-SNE of the tokens "
    "scored by the silhouette against the true labels — and a depth cut where the score falls below α × the last "
    "layer's. The blocks above the cut are removed; the final norm and the head are reused, then retrained."
)
loaded = state.pristine_model()
if loaded.plan is not None and not loaded.plan.is_dense:
    guide.needs(
        "This model is already pruned; SLS analyses and cuts its unpruned base.",
        "pages/1_model.py",
        "Load the base model",
    )
    st.stop()
depth = loaded.base.depth
c = st.columns([1, 1, 1, 2])
split = c[0].selectbox(
    "Analysis split",
    ["train", "val", "test"],
    key="sls_split",
    help="SLS analyses the labelled training split, without augmentation",
)
samples = int(
    c[1].number_input(
        "Samples",
        20,
        10000,
        1000,
        50,
        key="sls_samples",
        help="a seeded random subset of the split (SLS: about 1,000)",
    )
)
method = c[2].selectbox(
    "2-D embedding",
    EMBEDDINGS,
    key="sls_embed",
    help="t-SNE is the paper's (PCA init, seed 0, perplexity 30); UMAP and PCA are alternatives",
)
alpha = c[3].slider(
    "α — threshold factor",
    0.0,
    1.0,
    0.3,
    0.05,
    key="sls_alpha",
    help="keep layers scoring ≥ α × the last layer's score; a larger α removes fewer layers",
)
feats = None
with state.user_errors():
    spec = SeparabilitySpec(state.model_spec(), state.data_spec(), split=split, samples=samples, embed=method)
    feats = ui.features_or_job(spec, loaded, cached.model_key(), cached.data_key())
    curve = None if feats is None else ui.fast(feats.key, feats)
if feats is None:
    st.stop()

curve_box, cut_box, grid_box = st.container(), st.container(), st.container()
with grid_box:
    st.subheader(f"Per-layer {method} embeddings", divider="gray")
    # a list (not a set): it is saved in the workspace as JSON, so a reload shows the embedded layers again
    wanted = st.session_state.setdefault("sls_embedded", [])
    tag = f"{feats.key}:{method}"
    if tag not in wanted and st.button(
        f"Embed all {depth} layers ({method})",
        key="sls_embed_run",
        type="primary",
        icon=":material/scatter_plot:",
    ):
        wanted.append(tag)
    embs = {}
    if tag in wanted:
        bar = st.progress(0.0, text="Embedding the layers from the top, in SLS's scan order…")
        cells = [col.empty() for _ in range((depth + 3) // 4) for col in st.columns(4)]
        for j, b in enumerate(range(depth - 1, -1, -1)):
            embs[b] = ui.kept_embedding(feats.key, b, method, feats)
            cells[b].plotly_chart(
                ui.panel(embs[b], feats, legend=b == depth - 1),
                key=f"sls_panel_{b}",
                config={"displaylogo": False},
            )
            bar.progress((j + 1) / depth, text=f"layer {b + 1} embedded ({j + 1}/{depth})")
        bar.empty()
    else:
        st.caption("Until the layers are embedded, the curve and the suggested cut use the fast scores.")

sil = [embs[b].silhouette if b in embs else None for b in range(depth)]
full = len(embs) == depth
scored = f"{method} silhouette" if full else "high-dim silhouette (fast)"
cut = sls_cut(sil, alpha) if full else curve.cut(alpha)
with cut_box:
    st.subheader("Cut", divider="gray")
    st.markdown(f"**Suggested: keep {cut.keep} of {depth} blocks** (α rule on the {scored}). {cut.reason}")
    # the slider follows the suggestion until the user moves it *itself*: its on_change marks that. (Comparing
    # it with the last suggestion went stale when α moved by keyboard: a rerun cut short between the two updates
    # left them apart, which then read as "moved by hand".)
    manual = st.session_state.get("sls_keep_manual", False)
    if not manual or not 1 <= st.session_state.get("sls_keep", 0) <= depth:
        st.session_state["sls_keep"] = cut.keep
    st.session_state["sls_suggested"] = cut.keep
    st.button(
        f"Use the suggested cut ({cut.keep})",
        key="sls_use_suggested",
        type="secondary",  # a button that looks like one (tertiary read as plain text)
        icon=":material/auto_fix_high:",
        on_click=lambda: st.session_state.update(sls_keep=cut.keep, sls_keep_manual=False),
    )
    keep = st.slider(
        "Blocks to keep",
        1,
        depth,
        key="sls_keep",
        on_change=lambda: st.session_state.update(sls_keep_manual=True),
    )
    pv = preview_cut(loaded, keep, base_images_per_s=ui.base_speed(cached.model_key(), loaded))
    m = st.columns(4)
    m[0].metric("Blocks removed", pv["removed"])
    m[1].metric("Params", human(pv["params"]), f"{pv['params_fraction'] - 1:+.0%}", "inverse")
    m[2].metric("MACs", human(pv["macs"]), f"{pv['macs_fraction'] - 1:+.0%}", "inverse")
    m[3].metric(
        "Estimated images/s (bs 64)",
        human(pv["est_images_per_s"]),
        f"×{pv['ideal_speedup']:.2f}",
        help="the measured dense throughput × the MACs ratio (ideal); measured for real after pruning",
    )
    r = st.columns(4)
    preset = r[0].selectbox(
        "Retraining",
        ["cpu", "paper", "none"],
        key="sls_retrain",
        help="the SLS recipe: AdamW 1e-3, wd 1e-4, cosine with warm-up, batch 64; paper = "
        "100 epochs (a background job), cpu = 20 epochs (here, now)",
    )
    trainable = r[1].selectbox(
        "What retrains",
        TRAINABLE,
        key="sls_trainable",
        help="auto: adapters + head for PETL models, head + final norm otherwise; lora / convpass: fresh "
        "adapters (Convpass, the paper's, stays in the export; LoRA folds back) + head",
    )
    bench = r[2].checkbox(
        "Measure throughput", True, key="sls_bench", help="batch 1 (50 warm-up, 100 timed) and 64"
    )
    spec = SLSRunSpec(
        model=state.model_spec(),
        data=state.data_spec(),
        keep=keep,
        alpha=alpha,
        embed=method,
        samples=samples,
        analysis_split=split,
        retrain=preset,
        trainable=trainable,
        bench=bench,
    )
    with r[3]:
        if preset != "none":  # retraining takes minutes: a job, with progress, cancel and resume
            ui_jobs.start_job_button(
                f"Prune to {keep} blocks + retrain (job)", spec, key="sls_job", device=str(loaded.device)
            )
        elif st.button(
            f"Prune to {keep} blocks", key="sls_run", type="primary", icon=":material/content_cut:"
        ):
            with state.user_errors():
                bar = state.StreamlitProgress("SLS")
                _, result = start(spec, root=state.runs_root(), loaded=loaded, callbacks=[bar])
                st.session_state["sls_last"] = result.to_dict()
                bar.done()
    job = st.session_state.get("sls_job_run")
    if job and jobs.job_status(job).state != "done":
        ui_jobs.job_panel(job)
    elif job:
        st.session_state["sls_last"], st.session_state["sls_job_run"] = RunDir(job).results(), None
    if st.session_state.get("sls_last"):
        ui.show_result(st.session_state["sls_last"])

with curve_box:
    df = ui.curve_frame(curve, sil, method)
    charts.show(ui.curve_figure(df, cut, keep, scored), df, key="sls_curve", name="sls_separability")
guide.next_step(("pages/11_export.py", "export the cut model"), ("pages/8_runs.py", "compare runs"))
