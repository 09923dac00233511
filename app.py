"""Pruning Studio: the entry point. Run with ``streamlit run app.py`` (or ``make studio``).

Routes through ``st.navigation`` in sections that follow the work — model & data, analyze, prune, retrain,
benchmark & compare, export — and draws the shared sidebar. A page appears once its file exists. Around every
run the session is restored from / saved to its workspace (``?ws=<id>`` in the URL, :mod:`studio.workspace`).
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from studio.threads import SERVER_ENV
from studio.ui import sidebar, state

# jobs started from this process leave the server a core of its own (studio.threads)
os.environ[SERVER_ENV] = "1"

ROOT = Path(__file__).resolve().parent

# section -> (page file, title, icon, url path)
SECTIONS: dict[str, list[tuple[str, str, str, str]]] = {
    "Model & data": [("pages/1_model.py", "Model & data", ":material/neurology:", "model")],
    "Analyze": [
        ("pages/2_layer_separability.py", "Layer separability", ":material/scatter_plot:", "separability"),
        ("pages/3_block_benefit.py", "Block benefit", ":material/stacked_bar_chart:", "block-benefit"),
        ("pages/4_importance.py", "Importance", ":material/grid_view:", "importance"),
        ("pages/12_sensitivity.py", "Sensitivity", ":material/show_chart:", "sensitivity"),
        ("pages/5_adapters.py", "Adapters", ":material/tune:", "adapters"),
    ],
    "Prune": [("pages/6_prune.py", "Prune", ":material/content_cut:", "prune")],
    "Retrain": [("pages/7_retrain.py", "Retrain", ":material/model_training:", "retrain")],
    "Benchmark & compare": [
        ("pages/8_runs.py", "Runs", ":material/history:", "runs"),
        ("pages/9_benchmark.py", "Benchmark", ":material/speed:", "benchmark"),
        ("pages/10_compare.py", "Compare", ":material/compare_arrows:", "compare"),
    ],
    "Export": [("pages/11_export.py", "Export", ":material/ios_share:", "export")],
}


def pages() -> dict[str, list[st.Page]]:
    """The navigation: only the pages whose file exists, so the app runs while pages are being written."""
    nav: dict[str, list[st.Page]] = {}
    for section, items in SECTIONS.items():
        found = [
            st.Page(path, title=title, icon=icon, url_path=url, default=url == "model")
            for path, title, icon, url in items
            if (ROOT / path).is_file()
        ]
        if found:
            nav[section] = found
    return nav


st.set_page_config(
    page_title="Pruning Studio",
    page_icon=":material/content_cut:",
    layout="wide",
    initial_sidebar_state="expanded",
)
page = st.navigation(pages(), position="sidebar", expanded=True)
state.begin_run()  # a reload (or a second tab with the same ?ws=) restores the workspace first
try:
    sidebar.render()
    page.run()
finally:  # also when the page stopped (st.stop) or asked for a rerun: the session's work goes to disk
    state.end_run()
