"""Mutants shared by the three connector test files (test_vlm_projection, test_qformer, test_flamingo)."""
from __future__ import annotations

import contextlib

import torch
from conftest import Mutant, patched

from modules.vlm import task as T


def labels_without_image_mask(ids):
    """The placeholder positions keep their <image> id as a target (the LLaVA collator bug)."""
    targets = ids[:, 1:].clone()
    targets[:, -2] = T.IGNORE_INDEX
    return targets


ORIGINAL_DRAW = T.draw_scenes


def one_answer_per_question(batch_size, noise, generator):
    """A skewed generator: every image has colour 0, shape 0, cell 0, so the question gives the answer away."""
    s = ORIGINAL_DRAW(batch_size, noise, generator)
    attributes = torch.zeros_like(s.attributes)
    images = torch.zeros_like(s.images)
    images[:, :, :4, :4] = T.SHAPE_MASKS[0].float() * T.RGB[0][:, None, None]
    return T.Scenes(images, attributes, s.question)


SKEWED_DATA = (patched(T, "draw_scenes", one_answer_per_question),
               patched(T, "bare_answers", lambda scenes, generator: scenes.answer))


@contextlib.contextmanager
def fresh_pretraining(*patches):
    """Apply the patches with the per-process cache of pretrained parts emptied before and after."""
    T._pretrained.cache_clear()
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p())
        yield
    T._pretrained.cache_clear()


NOT_FROZEN = patched(T, "freeze", lambda module: module)  # the pretrained copies keep requires_grad


def shared_mutants(trains: str) -> list[Mutant]:
    """The frozen-parts, trainable-count and learning mutants every connector audit has."""
    return [
        Mutant("frozen_weights_are_bit_identical", "encoder and LM not frozen", overrides={"steps": "1"},
               patch=NOT_FROZEN),
        Mutant(trains, "encoder and LM not frozen", overrides={"steps": "1"}, patch=NOT_FROZEN),
        Mutant("answers_questions_on_held_out_images", "learning rate 0", overrides={"lr": "0", "steps": "1"}),
    ]
