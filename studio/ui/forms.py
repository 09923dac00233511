"""Widgets drawn from data: one widget per declared method option (:class:`studio.prune.Option`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import streamlit as st

from ..prune import Option


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
