"""The LLaVA projector: the kernel against torch, the shared VLM task, the audit, one mutant per check."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from hypothesis import given, settings
from hypothesis import strategies as st
from vlm_mutants import SKEWED_DATA, fresh_pretraining, labels_without_image_mask, shared_mutants

from modules import vlm as M
from modules.transformer import ModelConfig, Transformer
from modules.vlm import task as T


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_projection_equals_nn_sequential_for_any_shape(B, P, d_v, d, seed):
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(d_v, d), nn.GELU(), nn.Linear(d, d))
    z = torch.randn(B, P, d_v)
    out = M.project_visual_tokens(z, mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
    assert out.shape == (B, P, d)
    torch.testing.assert_close(out, mlp(z), atol=1e-6, rtol=1e-6)


def test_transformer_inputs_embeds_and_zero_hook_change_nothing():
    lm = Transformer(ModelConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24),
                     generator=torch.Generator().manual_seed(0))
    ids = torch.randint(11, (2, 6), generator=torch.Generator().manual_seed(1))
    want = lm(ids)
    assert torch.equal(lm(None, inputs_embeds=lm.embed_tokens(ids)), want)
    assert torch.equal(lm(ids, layer_hook=lambda i, x: x), want)


def test_images_render_their_attributes():
    s = M.draw_scenes(64, 0.0, torch.Generator().manual_seed(0))
    patches = M.patchify(s.images)  # (B, 9, 48)
    lit = patches.abs().sum(-1) > 0
    assert torch.equal(lit.float().argmax(1), s.attributes[:, 2])  # the shape sits in its cell only
    assert torch.equal(lit.sum(1), torch.ones(64, dtype=torch.long))
    assert set(M.chance_accuracy() for _ in range(1)) == {(0.25 + 0.25 + 1 / 9) / 3}


def test_labels_mask_visual_positions_and_question():
    s = M.draw_scenes(4, 0.0, torch.Generator().manual_seed(0))
    ids = M.vlm_ids(s, 3)
    labels = M.vlm_labels(ids)
    assert (labels[:, :-1] == M.IGNORE_INDEX).all() and torch.equal(labels[:, -1], s.answer)


def relu_projector(patch_features, w1, b1, w2, b2):
    return F.relu(patch_features @ w1.T + b1) @ w2.T + b2


def pooled_projector(patch_features, w1, b1, w2, b2):
    out = M.project_visual_tokens(patch_features, w1, b1, w2, b2)
    return out + out.mean(dim=1, keepdim=True)


MUTANTS = [
    Mutant("projection_matches_torch_mlp", "ReLU for GELU", {"project_visual_tokens": relu_projector}),
    Mutant("each_token_depends_on_its_patch_only", "patches pooled into every token",
           {"project_visual_tokens": pooled_projector}),
    Mutant("visual_tokens_are_masked_from_the_loss", "<image> positions supervised", overrides={"steps": "1"},
           patch=patched(T, "vlm_labels", labels_without_image_mask)),
    Mutant("text_only_baseline_is_near_chance", "skewed data, bare questions with true answers",
           overrides={"steps": "1", "caption_fraction": "0.5"}, patch=lambda: fresh_pretraining(*SKEWED_DATA)),
    *shared_mutants("only_the_projector_trains"),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("vlm_projection", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("vlm_projection", MUTANTS)


@pytest.mark.parametrize("module", ["vlm_projection", "qformer", "flamingo"])
def test_report_draws_an_attention_heatmap_over_the_patches(module):
    """One attention map per connector, in the image's 3x3 layout, in percent: the Q-Former's queries
    attend to the patches only (100 in all); the LM (projector) also attends to the text, and the
    resampler's latents to themselves, so theirs sum to less."""
    result = audit_once(module, "toy", 0)
    (table,) = [t for t in result.tables.values() if t.get("draw") == "heatmap"]
    assert table["columns"] == ["row", "left", "centre", "right"]
    assert [r[0] for r in table["rows"]] == ["top", "middle", "bottom"]
    values = [v for r in table["rows"] for v in r[1:]]
    assert all(0 <= v <= 100 for v in values)
    assert sum(values) == pytest.approx(100, abs=0.5) if module == "qformer" else 0 < sum(values) < 100
    assert round(100 * result.scalars["attention on the object's patch"], 1) in values
