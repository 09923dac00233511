"""Widgets drawn from data: a method's declared budgets and one widget per declared option."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import streamlit as st

from ..prune import COMMON_OPTIONS, LATENCY_OPTIONS, Method, Option


def option_widget(opt: Option, key: str) -> Any:
    """A widget for one option, typed by the option (choices -> selectbox, bool -> toggle, numbers, text)."""
    label = opt.name.replace("_", " ")
    if opt.choices is not None:
        choices = list(opt.choices)
        index = choices.index(opt.default) if opt.default in choices else 0
        return st.selectbox(label, choices, index=index, help=opt.help, key=key)
    if opt.type is bool:
        return st.toggle(label, value=bool(opt.default), help=opt.help, key=key)
    if opt.type in (int, float) and opt.default is None:
        # no fixed default (the method picks one, e.g. from the data): an empty box means "the method's default",
        # never a made-up 0 that the method would then refuse or, worse, use
        v = st.number_input(label, value=None, placeholder="method default", help=opt.help, key=key)
        return None if v is None else opt.type(v)
    if opt.type is int:
        return int(st.number_input(label, value=int(opt.default), step=1, help=opt.help, key=key))
    if opt.type is float:
        return float(st.number_input(label, value=float(opt.default), format="%.4g", help=opt.help, key=key))
    return st.text_input(label, value="" if opt.default is None else str(opt.default), help=opt.help, key=key)


def option_widgets(options: Iterable[Option], prefix: str, *, columns: int = 3) -> dict[str, Any]:
    """Widgets for several options laid out in columns; returns ``{name: value}``."""
    options = list(options)
    if not options:
        return {}
    cols = st.columns(min(columns, len(options)))
    out = {}
    for i, opt in enumerate(options):
        with cols[i % len(cols)]:
            out[opt.name] = option_widget(opt, f"{prefix}_{opt.name}")
    return out


def budget_widgets(method: Method, depth: int, prefix: str) -> dict[str, Any]:
    """Exactly the budgets ``method`` declares (a MACs target, a prune ratio, a density, SLS's α or blocks kept),
    round-to-8 where it rounds widths, and a widget per other option; returns the method's ``params``."""
    b1, b2, b3 = st.columns([1, 2, 1])
    labels = {b.label: b for b in method.budgets}
    if len(labels) > 1:
        chosen = labels[b1.radio("Budget", list(labels), key=f"{prefix}_budget_{method.name}")]
    else:
        chosen = method.budgets[0]
        b1.caption(chosen.label)
    low, high, default = chosen.bounds(depth)
    kind = int if chosen.whole else float
    value = b2.slider(
        chosen.label, kind(low), kind(high), kind(default), kind(chosen.step), key=f"{prefix}_{chosen.option}"
    )
    params: dict[str, Any] = {chosen.option: value}
    if chosen.option == "target_latency":  # a latency is for a batch size, a runtime and a dtype: say which
        params.update(
            option_widgets([o for o in COMMON_OPTIONS if o.name in LATENCY_OPTIONS], f"{prefix}_lat")
        )
    rounding = next(o for o in COMMON_OPTIONS if o.name == "round_to")
    if method.rounds and b3.checkbox(
        "Round widths to 8", value=True, key=f"{prefix}_round8", help=rounding.help
    ):
        params["round_to"] = 8
    own = [o for o in method.options if o.name not in {b.option for b in method.budgets}]
    if own:
        with st.expander(f"{method.name} options", expanded=method.trains):
            params.update(option_widgets(own, f"{prefix}_opt_{method.name}"))
    return params
