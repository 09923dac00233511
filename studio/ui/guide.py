"""The guided flow: links to the next step, and "this page needs X first — get it here" notes."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from streamlit.errors import StreamlitAPIException

ROOT = Path(__file__).resolve().parents[2]


def page_exists(path: str) -> bool:
    """Whether a page file is present (the navigation only lists existing pages)."""
    return (ROOT / path).is_file()


def link(path: str, label: str, icon: str = ":material/arrow_forward:") -> bool:
    """A link to a page if it exists; returns whether it was drawn."""
    if not page_exists(path):
        return False
    try:
        st.page_link(path, label=label, icon=icon)
    except StreamlitAPIException:  # the page file exists but this app's navigation does not list it
        return False
    return True


def next_step(*candidates: tuple[str, str]) -> None:
    """A divider and a link to the first existing page among ``(path, label)`` candidates."""
    st.divider()
    for path, label in candidates:
        if link(path, f"Next: {label}"):
            return


def needs(message: str, path: str, label: str) -> None:
    """Say what the page needs first and link to where to get it."""
    st.info(message, icon=":material/info:")
    link(path, label)
