"""The workspace on disk (studio/workspace.py): state round trip, atomic and pickle-free files, bounded analyses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio.workspace import (
    WORKSPACES,
    Workspace,
    empty_state,
    jsonable,
    new_id,
    prune_workspaces,
    valid_id,
)


def test_ids_are_names_and_bad_ones_are_refused(tmp_path):
    a, b = new_id(), new_id()
    assert a != b and valid_id(a) and valid_id(b)
    for bad in ("../etc", "ABCDEFGH12", "short", "a" * 41, "abc.defgh", None, 12345678):
        assert not valid_id(bad)
    with pytest.raises(StudioError, match="not a workspace id"):
        Workspace.open(tmp_path, "../../outside")
    ws = Workspace.open(tmp_path, a)
    assert ws.path == tmp_path / WORKSPACES / a and ws.id == a


def test_state_round_trip_and_unchanged_state_is_not_rewritten(tmp_path):
    ws = Workspace.open(tmp_path, new_id())
    assert ws.load_state() == empty_state()  # nothing saved yet: an empty state, not an error
    state = {**empty_state(), "plan": {"method": "magnitude"}, "forms": {"prune_target_macs": 0.4}}
    assert ws.save_state(state) is True
    assert ws.save_state(state) is False  # same content: no write
    again = Workspace.open(tmp_path, ws.id).load_state()
    assert again["plan"] == {"method": "magnitude"} and again["forms"] == {"prune_target_macs": 0.4}
    files = sorted(p.name for p in ws.path.iterdir())
    assert files == ["state.json"]  # atomic writes leave no temp file behind


def test_damaged_state_starts_afresh(tmp_path):
    ws = Workspace.open(tmp_path, new_id())
    ws.path.mkdir(parents=True)
    (ws.path / "state.json").write_text("{not json")
    assert ws.load_state() == empty_state()
    (ws.path / "state.json").write_text(json.dumps({"version": 999, "plan": {"x": 1}}))
    assert ws.load_state()["plan"] is None  # another format version is not guessed at


def test_analysis_round_trip_with_arrays_is_safetensors_and_json(tmp_path):
    ws = Workspace.open(tmp_path, new_id())
    points = np.random.default_rng(0).random((50, 2)).astype(np.float32)
    ws.put_analysis("sls:abc:tsne:3", {"silhouette": 0.25}, {"points": points})
    meta, arrays = ws.get_analysis("sls:abc:tsne:3")
    assert meta == {"silhouette": 0.25}
    assert torch.equal(arrays["points"], torch.from_numpy(points))
    suffixes = sorted(p.suffix for p in (ws.path / "analyses").iterdir())
    assert suffixes == [".json", ".safetensors"]  # no pickle anywhere
    assert ws.get_analysis("sls:abc:tsne:4") is None
    ws.put_analysis("importance:x", {"scores": [1.0, 2.0]})  # JSON only
    assert ws.get_analysis("importance:x") == ({"scores": [1.0, 2.0]}, {})
    with pytest.raises(StudioError, match="not plain JSON"):
        ws.put_analysis("bad", {"value": float("nan")})


def test_analyses_are_capped_least_recently_used_first(tmp_path):
    ws = Workspace.open(tmp_path, new_id(), max_analyses=3)
    for i in range(3):
        ws.put_analysis(f"a{i}", {"i": i})
    assert ws.get_analysis("a0") is not None  # a0 used: now the most recent
    ws.put_analysis("a3", {"i": 3})
    assert ws.analyses() == ["a2", "a0", "a3"]  # a1 was the least recently used
    assert ws.get_analysis("a1") is None

    small = Workspace.open(tmp_path, new_id(), max_analysis_bytes=3000)
    for i in range(4):
        small.put_analysis(f"big{i}", {}, {"x": np.zeros(300, dtype=np.float32)})  # ~1.3 kB each
    kept = small.analyses()
    assert kept[-1] == "big3" and len(kept) == 2
    total = sum(p.stat().st_size for p in (small.path / "analyses").iterdir())
    assert total <= 3000


def test_jsonable():
    assert jsonable({"a": [1, 2.5, "x", None, True]})
    assert not jsonable({1: "int key"}) and not jsonable({"s": {1, 2}}) and not jsonable(float("inf"))


def test_the_number_of_workspaces_is_bounded(tmp_path):
    import os

    ids = [new_id() for _ in range(5)]
    for i, ws_id in enumerate(ids):
        ws = Workspace.open(tmp_path, ws_id)
        ws.save_state(empty_state())
        os.utime(ws.path / "state.json", (1000 + i, 1000 + i))  # saved in this order
    (tmp_path / WORKSPACES / "not-a-workspace.txt").write_text("kept")
    assert prune_workspaces(tmp_path, keep=2, spare=ids[0]) == ids[1:3]  # the oldest go, the spared stays
    left = sorted(p.name for p in (tmp_path / WORKSPACES).iterdir())
    assert left == sorted([ids[0], ids[3], ids[4], "not-a-workspace.txt"])
    assert prune_workspaces(tmp_path / "nowhere") == []
