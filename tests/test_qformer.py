"""The BLIP-2 Q-Former connector: the kernel against torch, the audit, one mutant per check."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st
from vlm_mutants import shared_mutants

from modules import vlm as M


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 30), st.sampled_from([1, 2, 4]), st.integers(0, 2**31 - 1))
def test_qformer_attention_equals_torch_and_keeps_n(B, N, P, heads, seed):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(8, heads, bias=False, kdim=5, vdim=5, batch_first=True)
    q, z = torch.randn(B, N, 8), torch.randn(B, P, 5)
    out = M.qformer_cross_attention(q, z, mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight,
                                    mha.out_proj.weight, heads)
    assert out.shape == (B, N, 8)
    torch.testing.assert_close(out, mha(q, z, z, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def unscaled(queries, patch_features, w_q, w_k, w_v, w_o, n_heads):
    return M.qformer_cross_attention(queries * math.sqrt(queries.shape[-1] // n_heads), patch_features,
                                     w_q, w_k, w_v, w_o, n_heads)


def values_per_patch(queries, patch_features, w_q, w_k, w_v, w_o, n_heads):
    """Ignores the queries: one output per patch (what a projector does)."""
    return patch_features @ w_v.T @ w_o.T


def causal_over_patches(queries, patch_features, w_q, w_k, w_v, w_o, n_heads):
    """Query i only sees patches 0..i (a causal mask copied into cross-attention)."""
    N, P = queries.shape[1], patch_features.shape[1]
    outs = [M.qformer_cross_attention(queries[:, i:i + 1], patch_features[:, :min(i + 1, P)], w_q, w_k, w_v, w_o,
                                      n_heads) for i in range(N)]
    return torch.cat(outs, dim=1)


MUTANTS = [
    Mutant("matches_torch_multihead_attention", "no 1/sqrt(d_head)", {"qformer_cross_attention": unscaled}),
    Mutant("output_has_n_tokens_for_any_patch_count", "one output per patch",
           {"qformer_cross_attention": values_per_patch}),
    Mutant("output_ignores_patch_order", "causal mask over patches", {"qformer_cross_attention": causal_over_patches}),
    *shared_mutants("only_the_qformer_trains"),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("qformer", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("qformer", MUTANTS)
