"""Audit of the LLaVA-style projector (day 12): the MLP's formula, one token per patch, frozen parts
untouched, visual positions out of the loss, and held-out answers against a text-only baseline."""
from __future__ import annotations

import torch
import torch.nn as nn

from audits import _vlm as V
from llmaudit.audit import Audit, kernel, max_error, measure
from modules import vlm as M


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"patch_features": torch.randn(2, 9, 6, generator=g), "w1": torch.randn(8, 6, generator=g) / 3,
            "b1": torch.randn(8, generator=g), "w2": torch.randn(8, 8, generator=g) / 3, "b2": torch.randn(8, generator=g)}


KERNELS = [kernel(M.project_visual_tokens, example=_example,
                  hint="W2 GELU(W1 z + b1) + b2 on every patch separately; weights in nn.Linear's (out, in) "
                       "layout, so multiply by their transpose; exact (erf) GELU.")]

vlm_projection = Audit("vlm_projection", day=12, title="LLaVA projector: patch features become soft tokens of a frozen LM",
                       config=M.ProjectionConfig, kernels=KERNELS, formulas=M.PROJECTION_FORMULAS)


@vlm_projection.check("< 1e-5", hint="the hidden layer is GELU, not ReLU; biases included.")
def projection_matches_torch_mlp(project_visual_tokens, g):
    """The projector is LLaVA-1.5's Linear-GELU-Linear; against nn.Sequential with the same weights, for
    1, 9 and 49 patches, the output is (B, P, d_model) and equal (a wrong shape is an infinite error)."""
    mlp = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32))
    errors = []
    for P in (1, 9, 49):
        z = torch.randn(3, P, 24, generator=g)
        out = project_visual_tokens(z, mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
        errors.append(max_error(out, mlp(z)))
    return errors


@vlm_projection.check("< 1e-6", hint="no pooling or mixing across patches inside the projector.")
def each_token_depends_on_its_patch_only(project_visual_tokens, g):
    """A projector is applied per patch: changing patch j moves token j and no other, which is why the
    LM's context grows by exactly one token per patch (576 for ViT-L/14 at 336 px)."""
    z = torch.randn(2, 9, 16, generator=g)
    w = [torch.randn(16, 16, generator=g) / 4, torch.randn(16, generator=g), torch.randn(16, 16, generator=g) / 4,
         torch.randn(16, generator=g)]
    base, moved = project_visual_tokens(z, *w), z.clone()
    moved[:, 4] += 1.0
    after = project_visual_tokens(moved, *w)
    others = [i for i in range(9) if i != 4]
    return measure(max_error(after[:, others], base[:, others]), f"patch 4 moved its token by "
                   f"{max_error(after[:, 4], base[:, 4]):.3f}")


@vlm_projection.fixture(cost=20)
def trained(cfg, ctx, g, project_visual_tokens):
    """The projector trained for cfg.steps on the frozen encoder and LM of this seed."""
    connector = M.MLPProjector(cfg.d_vision, cfg.d_model, project=project_visual_tokens)
    return M.run_connector(connector, cfg, ctx.seed, g)


@vlm_projection.check("== 0", hint="freeze the encoder and LM (requires_grad False) before building the optimizer.")
def frozen_weights_are_bit_identical(trained):
    """Stage 1 of LLaVA trains the projector only: the SHA-256 of the encoder's and the LM's weights is
    the same before and after training."""
    return V.changed_frozen_modules(trained)


@vlm_projection.check("== 0", hint="the optimizer must get only parameters that require a gradient.")
def only_the_projector_trains(trained, cfg):
    """The trainable parameters are exactly the projector's d(d_v + 1) + d(d + 1); the LM's and the
    encoder's thousands stay out of the optimizer."""
    return V.extra_trainable(trained, M.projector_parameters(cfg.d_vision, cfg.d_model))


@vlm_projection.check("== 0", hint="labels of the <image> placeholder positions must be -100.")
def visual_tokens_are_masked_from_the_loss(trained, cfg, g):
    """A soft token has no word id to predict, so the positions whose target is a visual token carry
    label -100 and get exactly zero gradient; only the answer is supervised."""
    grad, supervised = V.visual_position_gradient(trained, cfg, g)
    return measure(grad, f"{supervised} supervised targets")


@vlm_projection.check(">= min_accuracy", kind="outcome", hint="the connector must reach the LM; lr > 0.")
def answers_questions_on_held_out_images(trained):
    """With only the projector trained, the frozen LM answers colour, shape and place questions about
    fresh images far above chance (0.204): the projected patches read like the caption words it learned
    to copy."""
    return measure(trained.accuracy, f"text-only {trained.text_only_accuracy:.3f}")


@vlm_projection.check("<= max_text_only_accuracy", kind="outcome",
                      hint="the answer must depend on the image only (uniform attributes, no leak in the question).")
def text_only_baseline_is_near_chance(trained):
    """Without the image the frozen LM can only guess within the asked category: about (1/4 + 1/4 + 1/9)/3
    = 0.204, so whatever accuracy the VLM gains comes from the pixels."""
    return trained.text_only_accuracy


@vlm_projection.report
def curves(ctx, trained, cfg):
    V.record_training(ctx, trained, "projector")
    V.record_attention(ctx, cfg, "The frozen LM's attention (question word, last layer)",
                       lambda s: trained.connector.lm_attention_map(trained.frozen, s))
    ctx.table("Trainable parameters per connector (this config)", ["connector", "trainable", "visual tokens in the LM"],
              [["MLP projector (LLaVA)", M.projector_parameters(cfg.d_vision, cfg.d_model), M.N_PATCHES],
               ["Q-Former, 4 queries (BLIP-2)", M.qformer_parameters(4, cfg.d_vision, cfg.d_model), 4],
               ["Resampler + gated x-attn (Flamingo)",
                M.flamingo_trainable_parameters(4, cfg.d_vision, cfg.d_model, cfg.n_layers), 0],
               ["frozen LM", sum(p.numel() for p in trained.frozen.lm.parameters()), "-"],
               ["frozen vision encoder", sum(p.numel() for p in trained.frozen.encoder.parameters()), "-"]])
