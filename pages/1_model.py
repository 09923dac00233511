"""Model & data: choose what to prune and see where its capacity is spent."""

import pandas as pd
import streamlit as st

from studio.summary import measure_speed
from studio.ui import cached, charts, guide, picker, state
from studio.ui.charts import COLORS, human, pct
from studio.ui.units import units_table

DEMO_TITLES = {
    "demo": "Digits ViT (built-in demo, fine-tuned)",
    "demo-backbone": "Digits ViT backbone (built-in demo, pre-trained on shapes)",
}

st.title("Model & data")
st.caption(
    "Start here. The studio opens on a built-in demo: a 12-block ViT fine-tuned on scikit-learn's handwritten "
    "digits. Point it at your own timm ViT/DeiT checkpoint and your own ImageFolder or VTAB-1k data below."
)

with st.expander("Choose the model and data", expanded=state.model_spec().source == "demo"):
    picker.form()

with state.user_errors():
    loaded = state.pristine_model()
    s = cached.summary()
    # the demo is named as what it is; its timm config name (vit_tiny_patch16_224, resized) goes in the caption
    demo = loaded.source in ("demo", "demo-backbone")
    st.subheader(DEMO_TITLES.get(loaded.source, s["arch"]) if demo else s["arch"], divider="gray")
    st.caption(
        f"{'timm config ' + s['arch'] + ' · ' if demo else ''}from {s['source']} · input {s['input_size']} · "
        f"{s['device']}"
    )
    c = st.columns(5)
    c[0].metric("Parameters", human(s["params"]), help=f"{s['params']:,} parameters")
    c[1].metric("MACs / image", human(s["macs"]), help=f"{s['macs']:,} multiply-accumulates, counted")
    c[2].metric("Blocks", s["depth"])
    c[3].metric("Width", s["embed_dim"], help="embedding (residual stream) channels")
    c[4].metric("Classes", s["num_classes"])
    if s["pruned"]:
        st.info("This model is already pruned (an export with a plan); prune methods need its unpruned base.")

    acc_col, macs_col = st.columns(2)
    with macs_col:
        macs = pd.DataFrame(
            {
                "part": ["attention matmuls", "linear layers", "patch embedding"],
                "macs": [s["macs_attention"], s["macs_linear"], s["macs_conv"]],
            }
        )
        macs["share"] = macs["macs"] / max(1, s["macs"])
        fig = charts.bar(
            macs,
            x="macs",
            y="part",
            orientation="h",
            color="part",
            colors={
                "attention matmuls": COLORS["attention"],
                "linear layers": COLORS["linear"],
                "patch embedding": COLORS["conv"],
            },
            title="Where the MACs go (per image)",
            height=240,
            hovertemplate=charts.hover("%{y}", MACs="%{x:,}"),
            legend=False,
        )
        charts.show(fig, macs, key="model_macs", name="macs_breakdown")
    with acc_col, state.user_errors():
        acc = cached.accuracy("test")
        st.metric("Test accuracy", pct(acc["top1"]), help=f"top-1 on {acc['n']} test images of {acc['data']}")
        per_class = pd.DataFrame(
            {"class": list(acc["per_class"]), "accuracy": list(acc["per_class"].values())}
        )
        fig = charts.bar(
            per_class,
            x="class",
            y="accuracy",
            title="Per-class accuracy (test)",
            height=240,
            hovertemplate=charts.hover("class %{x}", accuracy="%{y:.1%}"),
            legend=False,
        )
        fig.update_yaxes(tickformat=".0%", range=[0, 1])
        charts.show(fig, per_class, key="model_per_class", name="per_class_accuracy")

    st.subheader("Architecture", divider="gray")
    blocks = pd.DataFrame(s["blocks"])
    blocks["attention width"] = blocks["heads"] * blocks["head_dim"]
    long = blocks.melt(
        id_vars=["block", "heads", "head_dim"],
        value_vars=["attention width", "mlp"],
        var_name="part",
        value_name="channels",
    )
    fig = charts.bar(
        long,
        x="block",
        y="channels",
        color="part",
        colors={"attention width": COLORS["attention"], "mlp": COLORS["mlp"]},
        title="Width per block: heads × head dim, and MLP hidden neurons",
        custom_data=["heads", "head_dim"],
        hovertemplate=charts.hover(
            "block %{x}", channels="%{y}", heads="%{customdata[0]}", head_dim="%{customdata[1]}"
        ),
    )
    fig.update_xaxes(dtick=1)
    charts.show(fig, blocks, key="model_blocks", name="blocks")
    st.dataframe(
        blocks[["block", "heads", "head_dim", "mlp", "width", "params"]],
        hide_index=True,
        key="model_block_table",
        column_config={"params": st.column_config.NumberColumn("params", format="localized")},
    )
    with st.expander("What each method can prune in this model"):
        variants, table = units_table(loaded.model)
        st.caption(
            "Family variants detected: "
            + (", ".join(variants) or "none")
            + ". A method prunes the units it is built for, where every variant allows them (the README's family "
            "table says what the studio does with each variant's own modules)."
        )
        st.dataframe(table, hide_index=True, key="model_units")
    with st.expander("Data config (input size, normalisation)"):
        st.json(s["data_config"])

    st.subheader("Measured speed", divider="gray")
    st.caption(
        f"Forward passes on {s['device']} (float32, warm-up then median of repeats). "
        "The Benchmark page compares models, batch sizes and dtypes."
    )
    sizes = st.multiselect("Batch sizes", [1, 8, 32, 64, 128, 256], [1, 64], key="model_speed_bs")
    speeds = st.session_state.setdefault("model_speed", {})
    if st.button("Measure throughput", key="model_speed_run", icon=":material/speed:", disabled=not sizes):
        bar = state.StreamlitProgress("Measuring")
        speeds[cached.model_key()] = measure_speed(loaded, sorted(sizes), callbacks=[bar])
        bar.done()
    rows = speeds.get(cached.model_key())
    if rows:
        speed = pd.DataFrame(rows)[["batch_size", "images_per_s", "latency_ms", "latency_ms_p90", "device"]]
        st.dataframe(
            speed,
            hide_index=True,
            key="model_speed_table",
            column_config={
                "images_per_s": st.column_config.NumberColumn("images/s", format="%.1f"),
                "latency_ms": st.column_config.NumberColumn("latency ms (median)", format="%.2f"),
                "latency_ms_p90": st.column_config.NumberColumn("latency ms (p90)", format="%.2f"),
            },
        )
        charts.download_csv(speed, "throughput", key="model_speed_csv")

guide.next_step(
    ("pages/2_layer_separability.py", "see which layers separate the classes"),
    ("pages/6_prune.py", "prune the model"),
)
