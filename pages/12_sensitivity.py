"""Sensitivity: top-1 accuracy vs the fraction of one block's heads (or MLP neurons) removed, one line per block --
the per-layer sensitivity analysis of Li et al. (ICLR 2017) as Distiller and NNI users know it."""

import streamlit as st

from studio.analysis.importance import CRITERIA
from studio.analysis.sensitivity import SCOPES
from studio.ui import charts, guide, state
from studio.ui import sensitivity as vm
from studio.ui.charts import pct

st.title("Sensitivity")
st.caption(
    "Each block alone is pruned by removing its lowest-scored fraction of heads (or MLP neurons) and the model is "
    "evaluated, with every other block dense: one line per block, the dense accuracy dashed. A flat line is a "
    'block that tolerates pruning, a steep one a block to spare (Li et al., "Pruning Filters for Efficient '
    "ConvNets\", ICLR 2017; Distiller's sensitivity analysis). No fine-tuning: this ranks blocks, it does not "
    "predict the accuracy after recovery."
)

with state.user_errors():
    loaded = state.pristine_model()
    c1, c2, c3, c4 = st.columns([1, 1, 2, 1])
    scope = c1.selectbox(
        "Units removed", SCOPES, key="sens_scope", format_func={"heads": "heads", "mlp": "MLP neurons"}.get
    )
    names = CRITERIA.names()
    criterion = c2.selectbox(
        "Criterion",
        names,
        index=names.index("l1"),
        key="sens_criterion",
        help="which units go first: the lowest-scored ones (l1/l2 weight magnitude need no data)",
    )
    fractions = c3.multiselect(
        "Fractions removed", vm.FRACTIONS, [0.25, 0.5, 0.75], format_func=pct, key="sens_fractions"
    )
    limit = c4.number_input(
        "Images evaluated", 0, 1_000_000, 0, step=100, key="sens_limit", help="0: the whole test split"
    )
    batches = 4
    if criterion in CRITERIA and CRITERIA.get(criterion).needs_data:
        batches = int(st.number_input("Calibration batches (64 images)", 1, 64, 4, key="sens_batches"))

    spec = vm.sensitivity_spec(
        state.model_spec(), state.data_spec(), scope, criterion, fractions, limit=int(limit), batches=batches
    )
    problem = state.problem_of(spec)  # a bad choice is said here, before anything is evaluated
    if problem:
        st.error(problem, icon=":material/error:")
    res = vm.result(spec, loaded, problem)

    if res is not None:
        df = vm.frame(res)
        worst = df.sort_values("drop", ascending=False).iloc[0]
        m1, m2, m3 = st.columns(3)
        m1.metric("Dense top-1", pct(res.dense.top1), help=f"{res.dense.n:,} images of the test split")
        m2.metric(
            "Most sensitive block",
            f"block {int(worst['block'])}",
            f"{pct(-worst['drop'])} at {pct(worst['removed_fraction'], digits=0)} removed",
            delta_color="normal" if worst["drop"] > 0 else "off",
        )
        tolerant = df.groupby("block")["drop"].max().idxmin()
        m3.metric("Most tolerant block", f"block {int(tolerant)}")
        charts.show(vm.figure(res, df), df, key="sens", name=f"sensitivity-{res.scope}-{res.criterion}")
        if (df["removed"] == 0).any():
            st.caption(
                "Where a fraction removes no unit (e.g. 25 % of 3 heads rounds down to none), the point is the dense "
                "model: a block always keeps at least one unit."
            )
        table = df.pivot(index="block", columns="fraction", values="top1")
        table.columns = [f"top-1 at {pct(f, digits=0)}" for f in table.columns]
        st.dataframe(
            table.reset_index(),
            hide_index=True,
            key="sens_table",
            column_config={c: st.column_config.NumberColumn(c, format="percent") for c in table.columns},
        )
guide.next_step(
    ("pages/6_prune.py", "prune the tolerant blocks harder"), ("pages/4_importance.py", "see scores")
)
