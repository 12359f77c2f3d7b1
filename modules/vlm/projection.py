"""LLaVA's connector: an MLP projects every patch feature into the LM's embedding space, and the
projected vectors are spliced into the text as soft tokens.

    H_v = W_2 GELU(W_1 Z_v + b_1) + b_2        (LLaVA-1.5's mlp2x_gelu; LLaVA-1 used H_v = W Z_v)

One visual token per patch: the LM's context grows by P = 9 tokens here (576 for ViT-L/14 at 336 px).
Builds on: task.py (the frozen encoder and LM). Deviations: stage 1 only (the LM stays frozen).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.vlm.task import N_PATCHES, Connector, Frozen, Scenes, VLMConfig, patchify, prefix_embeddings, vlm_ids


@dataclass(frozen=True)
class ProjectionConfig(VLMConfig):
    """The shared task (VLMConfig) with the projector's outcome bars."""

    min_accuracy: float = 0.53  # held-out accuracy; sweep toy seeds 0-19: 0.592 .. 0.889 (text-only about 0.2)

    @classmethod
    def full(cls):
        # full seeds 0-9: 0.9985 .. 1.000 (with bare questions in the LM's pretraining: 0.77 .. 1.0, bimodal)
        return cls(encoder_steps=150, lm_steps=300, steps=800, eval_size=2048, min_accuracy=0.9)


def project_visual_tokens(patch_features: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                          w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """LLaVA-1.5's two-layer MLP projector, applied to every patch independently.

        H_v = W_2 GELU(W_1 Z_v + b_1) + b_2          (exact erf GELU, as nn.GELU())

    patch_features: (B, P, d_vision) the frozen encoder's output Z_v; w1: (d_model, d_vision), b1:
    (d_model,), w2: (d_model, d_model), b2: (d_model,) in nn.Linear's (out, in) layout. Returns
    (B, P, d_model): exactly one visual token per patch, in patch order, in the LM's embedding width.
    """
    hidden = F.gelu(patch_features @ w1.T + b1)  # (B, P, d_model)
    return hidden @ w2.T + b2


class MLPProjector(Connector):
    """Frozen encoder -> project_visual_tokens -> P soft tokens after <bos> -> frozen LM."""

    def __init__(self, d_vision: int, d_model: int, project: Callable = project_visual_tokens):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_vision, d_model), nn.Linear(d_model, d_model)
        self.project, self.n_visual = project, N_PATCHES

    def visual_tokens(self, frozen: Frozen, scenes: Scenes) -> torch.Tensor:
        features = frozen.encoder(patchify(scenes.images))  # (B, P, d_vision)
        return self.project(features, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)

    def logits(self, frozen: Frozen, scenes: Scenes, ids: torch.Tensor) -> torch.Tensor:
        embeds = prefix_embeddings(frozen.lm, ids, self.visual_tokens(frozen, scenes))
        return frozen.lm(None, inputs_embeds=embeds)

    def lm_attention_map(self, frozen: Frozen, scenes: Scenes) -> torch.Tensor:
        """(B, P): the share of the question word's attention (last LM layer, mean over heads) that
        lands on each patch's visual token: what the frozen LM reads when it answers."""
        attention = frozen.lm.layers[-1].self_attn
        attention.keep_probs = True
        try:
            self.logits(frozen, scenes, vlm_ids(scenes, self.n_visual)[:, :-1])
        finally:
            attention.keep_probs = False
        return attention.probs[:, :, -1, 1:1 + self.n_visual].mean(dim=1)  # position 0 is <bos>


def projector_parameters(d_vision: int, d_model: int) -> int:
    """Closed form: W_1 and b_1 (d_model (d_vision + 1)) plus W_2 and b_2 (d_model (d_model + 1))."""
    return d_model * (d_vision + 1) + d_model * (d_model + 1)


PROJECTION_FORMULAS = [
    ("LLaVA projector", r"$H_v = W_2\,\mathrm{GELU}(W_1 Z_v + b_1) + b_2$"),
    ("Visual tokens", r"$N_{vis} = (H/p)(W/p)$"),
    ("Loss", r"$L = -\sum_{t:\,y_t \neq -100} \log p(y_t \mid x_{<t})$"),
]
