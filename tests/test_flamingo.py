"""Flamingo's gated cross-attention: the kernel against torch, the cost table, the audit, one mutant per check."""
from __future__ import annotations

import torch
import torch.nn as nn
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st
from vlm_mutants import shared_mutants

from modules import vlm as M


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 6), st.floats(-3, 3), st.integers(0, 2**31 - 1))
def test_gated_cross_attention_equals_torch(B, T, Mlat, alpha, seed):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(8, 2, bias=False, batch_first=True)
    x, lat = torch.randn(B, T, 8), torch.randn(B, Mlat, 8)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    got = M.gated_cross_attention(x, lat, torch.tensor(alpha), w_q, w_k, w_v, mha.out_proj.weight, 2)
    want = x + torch.tanh(torch.tensor(alpha)) * mha(x, lat, lat, need_weights=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(M.gated_cross_attention(x, lat, torch.tensor(0.0), w_q, w_k, w_v, mha.out_proj.weight, 2), x)


def test_cost_of_concatenation_grows_quadratically_and_cross_attention_linearly():
    lm = M.lm_config(M.FlamingoConfig.toy())
    concat = [M.attention_flops(lm, 32, P, 4, "concat") for P in (0, 100, 200)]
    xattn = [M.attention_flops(lm, 32, P, 4, "xattn") for P in (0, 100, 200)]
    assert concat[2] - concat[1] > concat[1] - concat[0]  # convex in P
    assert xattn[2] - xattn[1] == xattn[1] - xattn[0]  # linear in P (the resampler only)


def sigmoid_gate(x, visual, alpha, w_q, w_k, w_v, w_o, n_heads):
    y = M.gated_cross_attention(x, visual, torch.tensor(20.0), w_q, w_k, w_v, w_o, n_heads)
    return x + torch.sigmoid(alpha) * (y - x)


def no_tanh(x, visual, alpha, w_q, w_k, w_v, w_o, n_heads):
    y = M.gated_cross_attention(x, visual, torch.tensor(20.0), w_q, w_k, w_v, w_o, n_heads)
    return x + alpha * (y - x) / torch.tanh(torch.tensor(20.0))


def gate_detached(x, visual, alpha, w_q, w_k, w_v, w_o, n_heads):
    return M.gated_cross_attention(x, visual, alpha.detach(), w_q, w_k, w_v, w_o, n_heads)


MUTANTS = [
    Mutant("matches_torch_attention_with_tanh_gate", "gate without tanh", {"gated_cross_attention": no_tanh}),
    Mutant("init_gives_the_frozen_lm_logits", "sigmoid gate", {"gated_cross_attention": sigmoid_gate}),
    Mutant("gates_open_with_training", "gate detached", {"gated_cross_attention": gate_detached},
           overrides={"steps": "3"}),
    *shared_mutants("only_the_new_layers_train"),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("flamingo", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("flamingo", MUTANTS)
