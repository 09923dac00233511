"""The only part of the studio that imports Streamlit: session state, caching, progress and charts."""

from __future__ import annotations


def _leave_legacy_pages_mode() -> None:
    """Make sure ``app.py``'s ``st.navigation`` routes every request, even the first one.

    Streamlit starts in its legacy multipage mode when a ``pages/`` folder sits next to the main script, and only
    leaves it once some run calls ``st.navigation``. Until then a first request for e.g. ``/prune`` runs
    ``pages/6_prune.py`` alone, without the app shell (page config, sections, sidebar). Every page imports this
    package, so the first such run flips Streamlit's process-wide switch and reruns through ``app.py``.
    """
    try:
        import streamlit as st
        from streamlit.runtime.pages_manager import PagesManager
        from streamlit.runtime.scriptrunner import get_script_run_ctx
    except ImportError:  # a Streamlit without these internals: legacy routing stays possible, nothing breaks
        return
    if PagesManager.uses_pages_directory and get_script_run_ctx() is not None:
        PagesManager.uses_pages_directory = False
        st.rerun()


_leave_legacy_pages_mode()
