"""The studio's one grouping (issue 12): the units' groups written out in ``studio.analysis.groups`` give exactly
the scores torch-pruning computes on its own DependencyGraph, on every model family torch-pruning can trace."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch_pruning as tp

from studio.analysis.criteria import accumulate_gradients, make_importance, with_grads
from studio.analysis.groups import group_sums, torch_pruning_scores, unit_scores
from studio.families import FAMILIES, split_packed_glu
from tests.test_families import _batches, _loaded

# torch-pruning maps a head's channels onto q_norm/k_norm as if they spanned all heads and fails (IndexError)
UNTRACEABLE = {"qk-norm"}


def _torch_pruning_groups(model: torch.nn.Module, importance: tp.importance.Importance) -> dict:
    """The oracle: torch-pruning's importance on its DependencyGraph groups (a head's channels from ``proj``'s
    input side, the MLP from ``fc2``'s input side, the embedding from the patch convolution's output)."""
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        x = torch.zeros(1, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)  # no random draw
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    chans, mlp = [], []
    for blk in model.blocks:
        a = blk.attn
        A = a.num_heads * a.head_dim
        g = DG.get_pruning_group(a.proj, tp.prune_linear_in_channels, idxs=list(range(A)))
        chans.append(importance(g).double().view(a.num_heads, a.head_dim))
        M = blk.mlp.fc2.in_features
        g = DG.get_pruning_group(blk.mlp.fc2, tp.prune_linear_in_channels, idxs=list(range(M)))
        mlp.append(importance(g).double())
    D = model.patch_embed.proj.out_channels
    g = DG.get_pruning_group(model.patch_embed.proj, tp.prune_conv_out_channels, idxs=list(range(D)))
    return {"channels": chans, "mlp": mlp, "embed": importance(g).double()}


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
@pytest.mark.parametrize("family", sorted(set(FAMILIES.names()) - UNTRACEABLE))
def test_the_studio_groups_give_torch_prunings_scores(family: str, importance: str) -> None:
    loaded = _loaded(family)
    grads = accumulate_gradients(loaded.model, list(_batches(loaded))) if importance == "taylor" else None
    traced = split_packed_glu(with_grads(loaded.model, grads))
    for blk in traced.blocks:
        # EVA-02's rotary table: torch-pruning reads its token-axis cat as a channel concat; the rotation mixes
        # dims inside a head only, so the groups are the same without it (as Isomorphic's copy runs)
        if getattr(blk.attn, "rope", None) is not None:
            blk.attn.rope = None
        # BEiT / relpos ViTs: the per-head bias adds to the logits and owns no qkv/proj weight, and the studio
        # does not score it; torch-pruning would put a RelPosMlp's output rows in the heads' groups (but not a
        # table's columns, an untraced lookup), so it traces without the bias, as Isomorphic's copy runs
        if getattr(blk.attn, "rel_pos", None) is not None:
            blk.attn.rel_pos = None
    oracle = _torch_pruning_groups(traced, make_importance(importance))
    ours = torch_pruning_scores(loaded.model, importance, grads)
    for theirs, mine in zip(oracle["channels"] + oracle["mlp"], ours.channels + ours.mlp):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    if "attention-pool" in family:
        # by design: the surgery keeps the pool's output on the kept embedding, so the studio's embedding group
        # also holds the pool's output side, which torch-pruning traces as a group of its own
        pool = {n for n in dict(loaded.model.named_parameters()) if n.startswith("attn_pool.")}
        assert pool, "the family has an attention pool"
        return
    torch.testing.assert_close(ours.embed, oracle["embed"], atol=1e-5, rtol=1e-5)


def test_random_scores_are_drawn_as_torch_pruning_draws_them() -> None:
    loaded = _loaded("ViT (class token)")
    torch.manual_seed(3)
    oracle = _torch_pruning_groups(copy.deepcopy(loaded.model), tp.importance.RandomImportance())
    torch.manual_seed(3)
    ours = torch_pruning_scores(loaded.model, "random")
    for theirs, mine in zip(oracle["channels"] + oracle["mlp"], ours.channels + ours.mlp):
        assert torch.equal(mine, theirs)
    assert torch.equal(ours.embed, oracle["embed"])


def test_every_coupled_weight_counts_once() -> None:
    """With a score of 1 per weight, a unit's score is the number of weights it owns (what the surgery removes)."""
    loaded = _loaded("scale norms (NormFormer)")
    m = loaded.model
    ones = {n: torch.ones_like(p) for n, p in m.named_parameters()}
    s = unit_scores(m, ones, ("heads", "head_dims", "mlp", "embed"))
    blk = m.blocks[0]
    D, d, H = m.embed_dim, blk.attn.head_dim, blk.attn.num_heads
    # a head: q, k, v rows (weights and biases), its proj columns, its scale-norm weight and bias entries
    assert s.heads[0][0] == 3 * d * (D + 1) + D * d + 2 * d
    assert s.head_dims[0][0] == H * (3 * (D + 1) + D + 2)
    assert s.mlp[0][0] == (D + 1) + D + 2  # fc1 row and bias, fc2 column, mlp.norm weight and bias
    total = sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks.0.mlp."))
    assert sum(s.mlp[0]) == total - D  # every MLP weight but fc2's bias (it lives on the embedding)


def test_qk_norm_entries_count_towards_head_dims_not_heads() -> None:
    loaded = _loaded("qk-norm")
    m = loaded.model
    elem = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    elem["blocks.1.attn.q_norm.weight"] = torch.arange(m.blocks[1].attn.head_dim, dtype=torch.float32)
    sums = group_sums(m, elem)
    assert torch.equal(sums.shared_dims[1], elem["blocks.1.attn.q_norm.weight"].double())
    s = unit_scores(m, elem, ("heads", "head_dims"))
    assert all(v == 0 for v in s.heads[1]) and list(s.head_dims[1]) == list(range(m.blocks[1].attn.head_dim))
