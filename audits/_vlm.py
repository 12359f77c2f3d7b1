"""Measurements shared by the three connector audits (vlm_projection, qformer, flamingo)."""
from __future__ import annotations

from typing import Callable

import torch

from modules import vlm as M


def changed_frozen_modules(result: M.ConnectorResult) -> int:
    """How many frozen modules (encoder, LM) hash differently after the connector's training."""
    return sum(result.hashes_before[k] != result.hashes_after[k] for k in result.hashes_before)


def extra_trainable(result: M.ConnectorResult, closed_form: int) -> int:
    """Parameters the optimizer would update minus the connector's closed-form count (0 when only
    the connector trains)."""
    return sum(p.numel() for p in M.optimizer_parameters(result.connector, result.frozen)) - closed_form


def visual_position_gradient(result: M.ConnectorResult, cfg, g: torch.Generator) -> tuple[float, int]:
    """(max |d loss / d logits| over positions whose target is a visual token, supervised targets):
    the loss must not reach back to the soft tokens' own predictions."""
    s = M.draw_scenes(16, cfg.noise, g)
    ids = M.vlm_ids(s, result.connector.n_visual)
    logits = result.connector.logits(result.frozen, s, ids[:, :-1]).detach().requires_grad_(True)
    M.vlm_loss(logits, M.vlm_labels(ids)).backward()
    visual_target = ids[:, 1:] == M.IMAGE  # (B, T-1)
    return logits.grad[visual_target].abs().max().item(), int((M.vlm_labels(ids) != M.IGNORE_INDEX).sum())


def attention_grid(weights: torch.Tensor) -> list[list]:
    """A (9,) attention over the patches as 3 labelled rows of 3 cells (the image's layout), in percent."""
    return [[row] + [round(100 * w, 1) for w in weights[r * M.GRID:(r + 1) * M.GRID].tolist()]
            for r, row in enumerate(("top", "middle", "bottom"))]


def record_attention(ctx, cfg, who: str, attention_map: Callable[[M.Scenes], torch.Tensor]) -> None:
    """``who``'s attention over the 3x3 patches of one image of this seed, drawn as a heatmap, and the
    share that lands on the object's patch. ``attention_map(scenes)`` -> (B, 9)."""
    s = M.draw_scenes(1, cfg.noise, torch.Generator().manual_seed(ctx.seed))
    with torch.no_grad():
        weights = attention_map(s)[0]
    colour, shape, cell = s.attributes[0].tolist()
    ctx.table(f"{who} over the 3x3 patches (%), one image: {M.COLOURS[colour]} {M.SHAPES[shape]} at "
              f"{M.PLACES[cell]}", ["row", "left", "centre", "right"], attention_grid(weights), draw="heatmap")
    ctx.scalar("attention on the object's patch", weights[cell])


def record_training(ctx, result: M.ConnectorResult, name: str, key: bool = True) -> None:
    """The connector's training curve (the brief's key curve unless the module marks another)."""
    ctx.series("train/loss", result.losses, x_label="connector step", label=f"{name}: answer NLL", key=key,
               y_label="NLL (nats)", title=f"{name} on the frozen encoder and LM")
    ctx.scalar("held-out accuracy", result.accuracy)
    ctx.scalar("text-only accuracy", result.text_only_accuracy)
    ctx.scalar("chance", M.chance_accuracy())
