"""The engine never imports Streamlit; no engine code loads pickles."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import studio

ROOT = Path(studio.__file__).parent


def engine_modules() -> list[str]:
    names = []
    for m in pkgutil.walk_packages([str(ROOT)], prefix="studio."):
        if not m.name.startswith("studio.ui") and m.name != "studio.__main__":
            names.append(m.name)
    return names


def test_engine_imports_without_streamlit():
    mods = engine_modules()
    assert "studio.train" in mods and "studio.models" in mods
    code = (
        "import sys; sys.modules['streamlit'] = None\n"
        + "\n".join(f"import {m}" for m in mods)
        + "\nprint('ok')"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_no_unsafe_torch_load():
    offenders = []
    for path in [*ROOT.rglob("*.py"), *(ROOT.parent / "pages").glob("*.py"), ROOT.parent / "app.py"]:
        if not path.exists():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.name}:{n}")
            if re.search(r"\bpickle\.loads?\(", line):
                offenders.append(f"{path.name}:{n}")
    assert offenders == []
