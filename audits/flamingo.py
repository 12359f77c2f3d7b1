"""Audit of Flamingo's connector (day 13): tanh-gated cross-attention that starts as the identity, gates
that open with training, frozen parts untouched, held-out answers, and the cost of cross-attention
against concatenation as the image grows."""
from __future__ import annotations

import torch
import torch.nn as nn

from audits import _vlm as V
from llmaudit.audit import Audit, kernel, max_error, measure
from modules import vlm as M


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 5, 8, generator=g), "visual": torch.randn(2, 3, 8, generator=g),
            "alpha": torch.tensor(0.7), **{w: torch.randn(8, 8, generator=g) / 3 for w in ("w_q", "w_k", "w_v", "w_o")},
            "n_heads": 2}


KERNELS = [kernel(M.gated_cross_attention, example=_example,
                  hint="y = x + tanh(alpha) * attention(q from x, k and v from the visual latents), heads of "
                       "d / n_heads scaled by 1/sqrt(d_head); alpha = 0 must give x exactly.")]

flamingo = Audit("flamingo", day=13, title="Flamingo: gated cross-attention injects vision into a frozen LM",
                 config=M.FlamingoConfig, kernels=KERNELS, formulas=M.FLAMINGO_FORMULAS)


@flamingo.check("< 1e-5", hint="the gate multiplies the attention output, through tanh, then the residual adds x.")
def matches_torch_attention_with_tanh_gate(gated_cross_attention, g):
    """For a gate alpha != 0 the layer equals x + tanh(alpha) * nn.MultiheadAttention(x, latents, latents)
    with the same matrices, for 1, 2 and 4 heads."""
    errors = []
    for heads, alpha in ((1, 0.3), (2, -1.2), (4, 2.0)):
        mha = nn.MultiheadAttention(16, heads, bias=False, batch_first=True)
        x, lat = torch.randn(3, 6, 16, generator=g), torch.randn(3, 4, 16, generator=g)
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        want = x + torch.tanh(torch.tensor(alpha)) * mha(x, lat, lat, need_weights=False)[0]
        got = gated_cross_attention(x, lat, torch.tensor(alpha), w_q, w_k, w_v, mha.out_proj.weight, heads)
        errors.append(max_error(got, want))
    return errors


@flamingo.fixture
def frozen(cfg, ctx):
    return M.pretrained(cfg, ctx.seed)


@flamingo.check("== 0", hint="gates start at alpha = 0 and enter through tanh (sigmoid(0) = 0.5 is not 0).")
def init_gives_the_frozen_lm_logits(gated_cross_attention, frozen, cfg, g):
    """With every alpha = 0, tanh(alpha) = 0 and the inserted layers add exactly nothing: the model's
    logits equal the frozen LM's bit for bit, so training starts from the pretrained LM, not from noise."""
    connector = M.Flamingo(cfg.n_latents, cfg.d_vision, cfg.d_model, cfg.n_heads, cfg.n_layers, gated_cross_attention)
    s = M.draw_scenes(32, cfg.noise, g)
    ids = M.vlm_ids(s, 0)[:, :-1]
    with torch.no_grad():
        return max_error(connector.logits(frozen, s, ids), frozen.lm(ids))


@flamingo.fixture(cost=20)
def trained(cfg, ctx, g, gated_cross_attention):
    """Resampler and gated layers trained for cfg.steps on the frozen encoder and LM of this seed."""
    connector = M.Flamingo(cfg.n_latents, cfg.d_vision, cfg.d_model, cfg.n_heads, cfg.n_layers, gated_cross_attention)
    return M.run_connector(connector, cfg, ctx.seed, g)


@flamingo.check(">= min_gate", kind="outcome", hint="alpha must receive a gradient: tanh(alpha) on the graph, alpha trainable.")
def gates_open_with_training(trained):
    """At alpha = 0 the attention weights get no gradient but alpha does (d tanh / d alpha = 1), so the
    gates open first: after training every |tanh(alpha)| is off zero."""
    gates = trained.connector.gates().detach().abs()
    return measure(gates.min().item(), "tanh(alpha) " + ", ".join(f"{v:.3f}" for v in gates.tolist()))


@flamingo.check("== 0", hint="freeze the encoder and LM (requires_grad False) before building the optimizer.")
def frozen_weights_are_bit_identical(trained):
    """Flamingo trains only the resampler and the inserted layers: the LM's and the encoder's weights hash
    the same after training, so the LM's text ability cannot be forgotten."""
    return V.changed_frozen_modules(trained)


@flamingo.check("== 0", hint="only the resampler and the gated layers may require a gradient.")
def only_the_new_layers_train(trained, cfg):
    """The trainable parameters are exactly the resampler's and the gated layers' closed form."""
    return V.extra_trainable(trained, M.flamingo_trainable_parameters(cfg.n_latents, cfg.d_vision, cfg.d_model,
                                                                      cfg.n_layers))


@flamingo.check(">= min_accuracy", kind="outcome", hint="the gated layers must read the latents and write into the residual.")
def answers_questions_on_held_out_images(trained):
    """With no visual token in its sequence, the frozen LM answers held-out questions far above its
    text-only accuracy: the image enters only through the gated cross-attention."""
    return measure(trained.accuracy, f"text-only {trained.text_only_accuracy:.3f}")


@flamingo.report
def cost_and_attention(ctx, trained, cfg):
    V.record_training(ctx, trained, "Flamingo", key=False)  # its brief shows the cost curve
    lm = M.lm_config(cfg)
    sizes = [9, 64, 256, 576, 1024, 2304]
    rows = M.cost_table(lm, cfg.n_text_cost, cfg.n_latents, sizes)
    ctx.table(f"Concatenation vs cross-attention, {cfg.n_text_cost} text tokens, {cfg.n_latents} latents",
              ["visual tokens P", "LM context (concat)", "LM context (x-attn)", "attention FLOPs (concat)",
               "attention FLOPs (x-attn)", "ratio", "LM forward FLOPs (concat)"], rows)
    for how, col, label in (("concat", 3, "concatenation"), ("xattn", 4, "gated cross-attention")):
        ctx.series(f"cost/attention_flops_{how}", [r[col] for r in rows], sizes, x_label="visual tokens P",
                   group="cost/attention_flops", smooth=False, label=label, y_label="attention FLOPs",
                   title="Attention FLOPs as the image grows", key=how == "concat")
    resampler = trained.connector.resampler
    V.record_attention(ctx, cfg, "The resampler latents' attention",
                       lambda s: resampler.attention_map(trained.frozen.encoder(M.patchify(s.images))))
