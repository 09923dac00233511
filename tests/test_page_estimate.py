"""The Prune page shows the calibration's memory estimate before anything runs (issue 19)."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent


def test_prune_page_shows_the_memory_estimate(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/6_prune.py").run()
    at.selectbox(key="prune_method").set_value("taylor").run()
    assert not at.exception
    caps = [c.value for c in at.caption]
    assert any(c.startswith("Calibration memory: ~") and "backward" in c for c in caps), caps
    at.selectbox(key="prune_method").set_value("random").run()  # no data: no estimate
    assert not any(c.value.startswith("Calibration memory") for c in at.caption)
