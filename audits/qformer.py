"""Audit of the BLIP-2 Q-Former connector (day 12): its cross-attention against torch's, N outputs for
any number of patches, no dependence on patch order, frozen parts untouched, held-out answers."""
from __future__ import annotations

import torch
import torch.nn as nn

from audits import _vlm as V
from llmaudit.audit import Audit, kernel, max_error, measure
from modules import vlm as M


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"queries": torch.randn(2, 3, 8, generator=g), "patch_features": torch.randn(2, 9, 6, generator=g),
            "w_q": torch.randn(8, 8, generator=g) / 3, "w_k": torch.randn(8, 6, generator=g) / 3,
            "w_v": torch.randn(8, 6, generator=g) / 3, "w_o": torch.randn(8, 8, generator=g) / 3, "n_heads": 2}


KERNELS = [kernel(M.qformer_cross_attention, example=_example,
                  hint="split d into n_heads heads, scale scores by 1/sqrt(d_head), softmax over the PATCHES "
                       "(last axis), no causal mask: queries are not a sequence.")]

qformer = Audit("qformer", day=12, title="BLIP-2 Q-Former: N learned queries read the patches for a frozen LM",
                config=M.QFormerConfig, kernels=KERNELS, formulas=M.QFORMER_FORMULAS)


def _weights(mha: nn.MultiheadAttention) -> dict:
    return {"w_q": mha.q_proj_weight, "w_k": mha.k_proj_weight, "w_v": mha.v_proj_weight, "w_o": mha.out_proj.weight}


@qformer.check("< 1e-5", hint="heads are consecutive slices of d; scale by 1/sqrt(d / n_heads).")
def matches_torch_multihead_attention(qformer_cross_attention, g):
    """Queries over patches is ordinary multi-head attention with kdim = vdim = d_vision: it equals
    nn.MultiheadAttention (no biases) with the same four matrices, for 1, 2 and 4 heads."""
    errors = []
    for heads in (1, 2, 4):
        mha = nn.MultiheadAttention(16, heads, bias=False, kdim=12, vdim=12, batch_first=True)
        q, z = torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 12, generator=g)
        want = mha(q, z, z, need_weights=False)[0]
        errors.append(max_error(qformer_cross_attention(q, z, **_weights(mha), n_heads=heads), want))
    return errors


@qformer.check("== 0", hint="the output has one row per QUERY; the patches are only keys and values.")
def output_has_n_tokens_for_any_patch_count(qformer_cross_attention, cfg, g):
    """The LM sees exactly N visual tokens whatever the resolution: for 1, 9, 49 and 196 patches the
    cross-attention returns (B, N, d), N = n_queries (a fixed budget, unlike the projector's P)."""
    d, dv = cfg.d_model, cfg.d_vision
    w = {"w_q": torch.randn(d, d, generator=g), "w_k": torch.randn(d, dv, generator=g),
         "w_v": torch.randn(d, dv, generator=g), "w_o": torch.randn(d, d, generator=g)}
    q = torch.randn(2, cfg.n_queries, d, generator=g)
    shapes = [tuple(qformer_cross_attention(q, z, **w, n_heads=cfg.n_heads).shape)
              for z in (torch.randn(2, P, cfg.d_vision, generator=g) for P in (1, 9, 49, 196))]
    wrong = [s for s in shapes if s != (2, cfg.n_queries, cfg.d_model)]
    return measure(len(wrong), f"shapes {sorted(set(shapes))}")


@qformer.check("< 1e-5", hint="no causal or positional mask between queries and patches.")
def output_ignores_patch_order(qformer_cross_attention, g):
    """Attention is a weighted sum over a set: permuting the patches leaves every query's output
    unchanged, so where a patch is must be written into its feature (the encoder's position embedding)."""
    mha = nn.MultiheadAttention(16, 4, bias=False, kdim=12, vdim=12, batch_first=True)
    q, z = torch.randn(2, 4, 16, generator=g), torch.randn(2, 9, 12, generator=g)
    perm = torch.randperm(9, generator=g)
    out = qformer_cross_attention(q, z, **_weights(mha), n_heads=4)
    return max_error(qformer_cross_attention(q, z[:, perm], **_weights(mha), n_heads=4), out)


@qformer.fixture(cost=20)
def trained(cfg, ctx, g, qformer_cross_attention):
    """The Q-Former trained for cfg.steps on the frozen encoder and LM of this seed."""
    connector = M.QFormer(cfg.n_queries, cfg.d_vision, cfg.d_model, cfg.n_heads, qformer_cross_attention)
    return M.run_connector(connector, cfg, ctx.seed, g)


@qformer.check("== 0", hint="freeze the encoder and LM (requires_grad False) before building the optimizer.")
def frozen_weights_are_bit_identical(trained):
    """BLIP-2 keeps both the image encoder and the LLM frozen: their weights hash the same after training."""
    return V.changed_frozen_modules(trained)


@qformer.check("== 0", hint="only the queries and the Q-Former's layers may require a gradient.")
def only_the_qformer_trains(trained, cfg):
    """The trainable parameters are exactly the Q-Former's closed form (queries N d, attention, FFN,
    norms, the FC into the LM); nothing of the LM or the encoder."""
    return V.extra_trainable(trained, M.qformer_parameters(cfg.n_queries, cfg.d_vision, cfg.d_model))


@qformer.check(">= min_accuracy", kind="outcome", hint="the queries must attend to the patch features.")
def answers_questions_on_held_out_images(trained):
    """Through N = 4 query tokens (fewer than the 9 patches) the frozen LM answers held-out questions far
    above its text-only accuracy: the queries extract what the LM needs."""
    return measure(trained.accuracy, f"text-only {trained.text_only_accuracy:.3f}")


@qformer.report
def curves(ctx, trained, cfg):
    V.record_training(ctx, trained, "Q-Former")
    V.record_attention(ctx, cfg, "The queries' attention", lambda s: trained.connector.attention_map(
        trained.frozen.encoder(M.patchify(s.images))))
