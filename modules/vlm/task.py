"""The VLM task shared by the three connectors: coloured shapes on a 3x3 grid, one-word answers, a
frozen vision encoder and a frozen tiny Llama.

    image     12 x 12 RGB, one 4 x 4 shape (square, ring, plus, cross) of one colour (red, green, blue,
              yellow) in one of the 9 cells of a 3 x 3 grid, plus Gaussian pixel noise
    patches   the 9 cells of 4 x 4 x 3 = 48 pixels: one patch holds the whole shape
    encoder   ViT-style: linear patch embedding + learned position embedding + one bidirectional
              pre-norm block; pretrained to name colour, shape and cell from the mean patch feature,
              then frozen
    LM        the tiny Llama of modules.transformer, pretrained on captioned questions
              "<bos> ring top red colour" -> "red" (caption words in random order), then frozen.
              (caption_fraction < 1 mixes in bare questions "<bos> colour" with random answers: the
              LM then learns to park the question word's attention on <bos> when there is nothing to
              copy, and that sink starves the prefix connectors' soft tokens of attention.)
    VLM       "<bos> [visual tokens] colour" -> "red": the connector must turn patch features into
              something the frozen LM reads like the caption it learned to copy from

Builds on: modules.transformer (the LM, with inputs_embeds and layer_hook). Deviations: a toy world
instead of CLIP ViT-L/14 and a 7B LLM; the encoder's pretraining is supervised attribute
classification, not contrastive image-text pairs; one image per sequence, no interleaving.
"""
from __future__ import annotations

import copy
import math
import functools
import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.transformer import ModelConfig, Transformer

IGNORE_INDEX = -100  # label excluded from the loss (PyTorch's and HF's convention)

COLOURS = ("red", "green", "blue", "yellow")
RGB = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
SHAPES = ("square", "ring", "plus", "cross")
PLACES = ("topleft", "top", "topright", "left", "centre", "right", "bottomleft", "bottom", "bottomright")
QUESTIONS = ("colour", "shape", "where")  # the attribute each question asks for
ANSWERS = (COLOURS, SHAPES, PLACES)
SPECIALS = ("<pad>", "<bos>", "<image>")
VOCAB = SPECIALS + QUESTIONS + COLOURS + SHAPES + PLACES
ID = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, IMAGE = (ID[w] for w in SPECIALS)
ANSWER_IDS = tuple(torch.tensor([ID[w] for w in words]) for words in ANSWERS)  # per question type
CELL, GRID = 4, 3  # pixels per cell side, cells per image side
N_PATCHES, PATCH_DIM = GRID * GRID, CELL * CELL * 3


def _shape_masks() -> torch.Tensor:
    """(4, 4, 4) bool: square (filled), ring (border), plus (2-wide), cross (both diagonals)."""
    i, j = torch.meshgrid(torch.arange(CELL), torch.arange(CELL), indexing="ij")
    return torch.stack([torch.ones(CELL, CELL, dtype=torch.bool),
                        (i == 0) | (j == 0) | (i == CELL - 1) | (j == CELL - 1),
                        (i == 1) | (i == 2) | (j == 1) | (j == 2),
                        (i == j) | (i + j == CELL - 1)])


SHAPE_MASKS = _shape_masks()


@dataclass(frozen=True)
class VLMConfig:
    """The shared task, the frozen encoder and LM, and the connector's training (every connector alike)."""

    noise: float = 0.1  # std of the Gaussian pixel noise
    caption_fraction: float = 1.0  # LM pretraining: share of questions preceded by their caption (0.75 taught a
    # <bos> attention sink: the projector and Q-Former then stalled on one category in 3 to 5 of 10 full seeds)
    d_vision: int = 32  # width of the vision encoder's patch features
    d_model: int = 32  # the LM's width
    n_layers: int = 1  # one block suffices to copy the asked attribute from the caption
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 64
    rope_theta: float = 100.0
    encoder_steps: int = 40  # vision pretraining: attribute classification from the mean patch feature
    lm_steps: int = 70  # LM pretraining on captioned and bare questions
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-2
    steps: int = 80  # connector training (the frozen parts never move)
    batch_size: int = 64
    lr: float = 1e-2
    eval_size: int = 512  # held-out images (fresh draws) per accuracy
    min_accuracy: float = 0.5  # outcome bar: held-out answer accuracy (each connector's config sets its own)
    max_text_only_accuracy: float = 0.3  # the LM without the image: chance 0.204; toy 0.123 .. 0.229, full 0.120 .. 0.222

    RANGES = {
        "noise": ">= 0", "caption_fraction": "[0, 1]", "d_vision": ">= 1", "d_model": ">= 1", "n_layers": ">= 1",
        "n_heads": ">= 1", "n_kv_heads": ">= 1", "d_ff": ">= 1", "rope_theta": "> 1", "encoder_steps": ">= 0",
        "lm_steps": ">= 0", "pretrain_batch": ">= 1", "pretrain_lr": ">= 0", "steps": ">= 0",
        "batch_size": ">= 1", "lr": ">= 0", "eval_size": ">= 1", "min_accuracy": "[0, 1]",
        "max_text_only_accuracy": "[0, 1]",
    }

    @classmethod
    def toy(cls):
        return cls()

    @classmethod
    def full(cls):
        return cls(encoder_steps=150, lm_steps=300, steps=800, eval_size=2048)


def chance_accuracy() -> float:
    """Accuracy of guessing uniformly per question type, questions drawn uniformly: (1/4 + 1/4 + 1/9) / 3."""
    return sum(1 / len(a) for a in ANSWERS) / len(ANSWERS)


# ---------------------------------------------------------------------------------------------------
# Images and questions


@dataclass
class Scenes:
    """A batch of images with their attributes and one question each."""

    images: torch.Tensor  # (B, 3, 12, 12)
    attributes: torch.Tensor  # (B, 3) long: colour, shape, cell
    question: torch.Tensor  # (B,) long: index into QUESTIONS

    @property
    def answer(self) -> torch.Tensor:
        """(B,) token id of the one-word answer."""
        return torch.stack([ANSWER_IDS[q][a] for q, a in zip(self.question.tolist(),
                                                             self.attributes.gather(1, self.question[:, None])[:, 0].tolist())])


def draw_scenes(batch_size: int, noise: float, generator: torch.Generator) -> Scenes:
    """Random colour, shape and cell per image, rendered, plus noise; a random question per image."""
    colour = torch.randint(len(COLOURS), (batch_size,), generator=generator)
    shape = torch.randint(len(SHAPES), (batch_size,), generator=generator)
    cell = torch.randint(N_PATCHES, (batch_size,), generator=generator)
    question = torch.randint(len(QUESTIONS), (batch_size,), generator=generator)
    canvas = torch.zeros(batch_size, 3, N_PATCHES, CELL, CELL)
    drawn = SHAPE_MASKS[shape].float()[:, None] * RGB[colour][:, :, None, None]  # (B, 3, 4, 4)
    canvas[torch.arange(batch_size), :, cell] = drawn
    images = canvas.view(batch_size, 3, GRID, GRID, CELL, CELL).permute(0, 1, 2, 4, 3, 5)
    images = images.reshape(batch_size, 3, GRID * CELL, GRID * CELL)
    images = images + noise * torch.randn(images.shape, generator=generator)
    return Scenes(images, torch.stack([colour, shape, cell], dim=1), question)


def patchify(images: torch.Tensor, patch: int = CELL) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C): row-major patches, as a ViT's stride-p convolution sees them."""
    B, C, H, W = images.shape
    x = images.view(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def question_tokens(question: torch.Tensor) -> torch.Tensor:
    """(B,) question types -> (B, 1) ids of the question word ("colour", "shape", "where")."""
    return torch.tensor([ID[q] for q in QUESTIONS])[question][:, None]


def caption_tokens(attributes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3) attributes -> (B, 3) ids of "<colour> <shape> <place>" in a random order per row: the LM
    must find the asked word by what it is, not by where it stands."""
    words = torch.stack([ANSWER_IDS[k][attributes[:, k]] for k in range(3)], dim=1)
    slots = torch.cat([words, torch.full((words.shape[0], N_PATCHES - 3), PAD)], dim=1)
    return slots.gather(1, torch.rand(slots.shape, generator=generator).argsort(dim=1))


# ---------------------------------------------------------------------------------------------------
# The vision encoder (pretrained, then frozen)


class VisionEncoder(nn.Module):
    """Patches (B, P, 48) -> patch features (B, P, d_vision): patch embedding, positions, one block."""

    def __init__(self, d: int, n_heads: int, n_positions: int = N_PATCHES):
        super().__init__()
        self.patch_embed = nn.Linear(PATCH_DIM, d)
        self.position = nn.Parameter(torch.randn(n_positions, d))  # unit scale: every patch knows its cell
        self.block = nn.TransformerEncoderLayer(d, n_heads, 2 * d, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patches) + self.position[: patches.shape[1]]
        return self.norm(self.block(x))


def pretrain_encoder(cfg: VLMConfig, generator: torch.Generator) -> VisionEncoder:
    """Supervised pretraining: three linear heads name colour, shape and cell from the mean feature."""
    encoder = VisionEncoder(cfg.d_vision, cfg.n_heads)
    heads = nn.ModuleList(nn.Linear(cfg.d_vision, len(a)) for a in ANSWERS)
    optimizer = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=cfg.pretrain_lr)
    for _ in range(cfg.encoder_steps):
        s = draw_scenes(cfg.pretrain_batch, cfg.noise, generator)
        pooled = encoder(patchify(s.images)).mean(dim=1)
        loss = sum(F.cross_entropy(h(pooled), s.attributes[:, k]) for k, h in enumerate(heads))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return encoder


# ---------------------------------------------------------------------------------------------------
# The language model (pretrained on the caption language, then frozen)


def lm_config(cfg: VLMConfig) -> ModelConfig:
    return ModelConfig(vocab_size=len(VOCAB), d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, rope_theta=cfg.rope_theta)


def bare_answers(scenes: Scenes, generator: torch.Generator) -> torch.Tensor:
    """(B,) answers for questions asked without a caption: uniform within the asked category, drawn
    independently of the scene (the text alone says nothing about the image)."""
    random = torch.stack([torch.randint(len(w), (len(scenes.question),), generator=generator) for w in ANSWERS], dim=1)
    return Scenes(scenes.images, random, scenes.question).answer


def pretrain_lm(cfg: VLMConfig, generator: torch.Generator) -> Transformer:
    """Answer loss on "<bos> caption q answer" (caption_fraction of the rows) and on "<bos> q answer"
    with a random answer (no caption, nothing to copy: the LM learns the answer set of each q)."""
    lm = Transformer(lm_config(cfg), generator=generator)
    optimizer = torch.optim.Adam(lm.parameters(), lr=cfg.pretrain_lr)
    n_cap = round(cfg.caption_fraction * cfg.pretrain_batch)
    for _ in range(cfg.lm_steps):
        s = draw_scenes(cfg.pretrain_batch, 0.0, generator)
        bos = torch.full((cfg.pretrain_batch, 1), BOS)
        q, a = question_tokens(s.question), s.answer[:, None]
        with_caption = torch.cat([bos, caption_tokens(s.attributes, generator), q, a], dim=1)[:n_cap]
        bare = torch.cat([bos, q, bare_answers(s, generator)[:, None]], dim=1)[n_cap:]
        loss = sum(F.cross_entropy(lm(x[:, :-1])[:, -1], x[:, -1]) * len(x)
                   for x in (with_caption, bare) if len(x)) / cfg.pretrain_batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return lm


@dataclass
class Frozen:
    """The frozen parts every connector shares: the vision encoder and the LM (requires_grad off)."""

    encoder: VisionEncoder
    lm: Transformer

    def modules(self) -> dict[str, nn.Module]:
        return {"vision encoder": self.encoder, "LM": self.lm}


def freeze(module: nn.Module) -> nn.Module:
    """requires_grad off and eval mode: the optimizer never sees these weights."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over every tensor of the state_dict (names and raw bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


PRETRAIN_FIELDS = ("noise", "caption_fraction", "d_vision", "d_model", "n_layers", "n_heads", "n_kv_heads",
                   "d_ff", "rope_theta", "encoder_steps", "lm_steps", "pretrain_batch", "pretrain_lr")


@functools.lru_cache(maxsize=4)
def _pretrained(fields: tuple, seed: int) -> Frozen:
    cfg = VLMConfig(**dict(zip(PRETRAIN_FIELDS, fields)))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init reads the global RNG: seed it here, so
        torch.manual_seed(seed)              # the frozen parts depend on (cfg, seed) only, not on who asked first
        return Frozen(pretrain_encoder(cfg, g), pretrain_lm(cfg, g))


def pretrained(cfg: VLMConfig, seed: int) -> Frozen:
    """The frozen encoder and LM of (the shared part of) cfg and seed: pretrained once per process and
    handed out as frozen copies, so the three connector audits of one seed share them and none can
    alter them."""
    frozen = copy.deepcopy(_pretrained(tuple(getattr(cfg, f) for f in PRETRAIN_FIELDS), seed))
    for module in frozen.modules().values():
        freeze(module)
    return frozen


# ---------------------------------------------------------------------------------------------------
# Connector training on the frozen parts (shared by every connector)


def vlm_labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets of "<bos> <image>... q answer" (B, T): ids shifted by one, IGNORE_INDEX
    wherever the target is a visual token (a soft token has no word to predict) and on the question
    word (the prompt, as in SFT): only the answer is learned."""
    targets = ids[:, 1:].clone()
    targets[targets == IMAGE] = IGNORE_INDEX
    targets[:, -2] = IGNORE_INDEX  # the question word
    return targets


class Connector(nn.Module):
    """What a connector provides: ``logits(frozen, scenes, ids)`` for the VLM sequence ``ids``."""

    n_visual: int  # visual tokens placed in the sequence (0 for cross-attention)

    def logits(self, frozen: Frozen, scenes: Scenes, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def vlm_ids(scenes: Scenes, n_visual: int) -> torch.Tensor:
    """(B, 1 + n_visual + 2): <bos>, n_visual <image> placeholders, the question word, the answer."""
    B = scenes.question.shape[0]
    return torch.cat([torch.full((B, 1), BOS), torch.full((B, n_visual), IMAGE),
                      question_tokens(scenes.question), scenes.answer[:, None]], dim=1)


def prefix_embeddings(lm: Transformer, ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """The LM's input embeddings of ``ids`` with the <image> positions replaced, in order, by ``visual``
    (B, n_visual, d): LLaVA's and BLIP-2's way of handing soft tokens to a frozen LM."""
    x = lm.embed_tokens(ids.clamp_min(0))
    return x.masked_scatter((ids == IMAGE)[..., None], visual.to(x.dtype))


def vlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the supervised (non-IGNORE_INDEX) targets."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def optimizer_parameters(connector: nn.Module, frozen: Frozen) -> list[nn.Parameter]:
    """Every parameter that requires a gradient, the frozen modules' included: freezing is what keeps
    them out (as with optimizer = AdamW(p for p in model.parameters() if p.requires_grad))."""
    return [p for m in (connector, *frozen.modules().values()) for p in m.parameters() if p.requires_grad]


def train_connector(connector: Connector, frozen: Frozen, cfg: VLMConfig, generator: torch.Generator,
                    labels_fn: Callable = vlm_labels) -> list[float]:
    """Adam (learning rate cosine-decayed from cfg.lr to 0) on every parameter that requires a gradient:
    the connector's; the frozen LM and encoder are run, never updated."""
    optimizer = torch.optim.Adam(optimizer_parameters(connector, frozen), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        s = draw_scenes(cfg.batch_size, cfg.noise, generator)
        ids = vlm_ids(s, connector.n_visual)
        loss = vlm_loss(connector.logits(frozen, s, ids[:, :-1]), labels_fn(ids))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def answer_accuracy(connector: Connector | None, frozen: Frozen, n: int, noise: float,
                    generator: torch.Generator) -> float:
    """Greedy answer (argmax over the whole vocabulary) right on ``n`` fresh images; connector None
    is the text-only baseline: the frozen LM reads "<bos> q" without the image."""
    s = draw_scenes(n, noise, generator)
    if connector is None:
        ids = vlm_ids(s, 0)
        logits = frozen.lm(ids[:, :-1])
    else:
        ids = vlm_ids(s, connector.n_visual)
        logits = connector.logits(frozen, s, ids[:, :-1])
    return (logits[:, -1].argmax(-1) == ids[:, -1]).float().mean().item()


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@dataclass
class ConnectorResult:
    """One connector trained on the frozen parts: what every connector audit checks."""

    connector: Connector
    frozen: Frozen
    hashes_before: dict[str, str]  # weights_hash per frozen module before training
    hashes_after: dict[str, str]
    losses: list[float]
    accuracy: float  # held-out answer accuracy with the image
    text_only_accuracy: float  # the frozen LM without the image


def run_connector(connector: Connector, cfg: VLMConfig, seed: int, generator: torch.Generator,
                  labels_fn: Callable = vlm_labels) -> ConnectorResult:
    """Hash the frozen parts, train the connector, hash again, measure held-out accuracy both ways."""
    frozen = pretrained(cfg, seed)
    before = {k: weights_hash(m) for k, m in frozen.modules().items()}
    losses = train_connector(connector, frozen, cfg, generator, labels_fn)
    after = {k: weights_hash(m) for k, m in frozen.modules().items()}
    acc = answer_accuracy(connector, frozen, cfg.eval_size, cfg.noise, generator)
    text_only = answer_accuracy(None, frozen, cfg.eval_size, cfg.noise, generator)
    return ConnectorResult(connector, frozen, before, after, losses, acc, text_only)
