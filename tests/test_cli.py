"""CLI contract: one JSON object on stdout with --json, one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "studio", *args], capture_output=True, text=True, env=ENV, timeout=300
    )


def test_info_json():
    p = run("info", "--model", "demo", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["depth"] == 12 and out["params"] == 1_363_498 and out["macs"] == 23_522_496


def test_eval_json_reaches_95_percent():
    p = run("eval", "--model", "demo", "--data", "demo", "--json")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 1  # exactly one JSON object; progress went to stderr
    out = json.loads(p.stdout)
    assert out["top1"] >= 0.95 and out["n"] == 270 and out["macs"] > 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("info", "--model", "/nope.pth"), "not found"),
        (("eval", "--data", "imagefolder:/no/such/dir"), "does not exist"),
        (("info", "--device", "cuda:3"), "no CUDA GPU"),
    ],
)
def test_errors_are_one_line(args, needle):
    p = run(*args)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and needle in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""
