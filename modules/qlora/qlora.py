"""QLoRA: a frozen base stored in 4-bit NormalFloat (NF4) with double quantization, plus LoRA.

    NF4 code   16 values: 8 positive and 7 negative quantiles of N(0, 1) and an exact 0, divided by the
               largest: q_i = Phi^-1(p_i), p from linspace(0.9677083, 0.5, 9) (and 8 for the negative side)
    quantize   per block of 64: c = max |w|;  code_i = argmin_j |w_i / c - NF4_j|  (nearest, via midpoints)
    dequantize w_hat_i = c * NF4[code_i];   |w_i - w_hat_i| <= c * (largest gap of NF4) / 2
    double q.  the block constants c (fp32) minus their mean, quantized to 8 bits in blocks of 256
    storage    4 + 8/64 + 32/(64 * 256) = 4.127 bits per weight (4.5 without double quantization)
    forward    h = dequant(W_NF4) x + s B A x   (LoRA of modules.lora; only A, B train)

Builds on: lora (LoRALinear, the copy -> swap task, fine-tuning), transformer, training.
Deviations from bitsandbytes: the second level quantizes c - mean(c) with a LINEAR 8-bit absmax code
(int8, per block of 256) where bitsandbytes uses its 8-bit dynamic (float-like) map -- the same bits;
compute runs in float32 on the CPU (QLoRA dequantizes to bf16 on the GPU); no paged optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.lora import LoRAConfig, exact_match, finetune, task_batch, train_base
from modules.lora.lora import FinetuneRun, LoRALinear, lora_forward
from modules.transformer import Transformer

__all__ = [
    "FORMULAS", "NF4_BNB", "QLoRAConfig", "nf4_codebook", "NF4", "INT4",
    "nf4_quantize", "nf4_dequantize", "quantize_blocks", "dequantize_blocks",
    "pack_nibbles", "unpack_nibbles", "double_quantize", "double_dequantize",
    "NF4Linear", "quantize_model", "linear_layers", "nf4_bytes", "bits_per_parameter",
    "MemoryRow", "finetune_memory", "LLAMA2_7B", "QLoRAResult", "run",
]

FORMULAS = [
    ("NF4 code", r"$q_i=\Phi^{-1}(p_i)/\max_j|\Phi^{-1}(p_j)|,\ \mathrm{8\ positive,\ 7\ negative},\ 0$"),
    ("Blockwise absmax", r"$c_b=\max_{i\in b}|w_i|,\ \ k_i=\arg\min_j|w_i/c_b-q_j|,\ \ \hat w_i=c_b\,q_{k_i}$"),
    ("Error bound", r"$|w_i-\hat w_i|\leq c_b\,\max_j(q_{j+1}-q_j)/2$"),
    ("Bits per weight", r"$4+\frac{8}{64}+\frac{32}{64\cdot 256}=4.127\ \ (4+\frac{32}{64}=4.5)$"),
    ("QLoRA forward", r"$h=\mathrm{dequant}(c_1,c_2,W^{NF4})\,x+s\,BAx$"),
]

# bitsandbytes functional.get_4bit_type("nf4") (commit 95f9af3), index 0..15: the values to reproduce
NF4_BNB = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0)


def nf4_codebook(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values, float32, sorted: bitsandbytes' create_normal_map(offset, use_extra_value=True)
    recomputed with torch's inverse normal CDF (float64), then rounded to float32 and divided by the max."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()


NF4 = nf4_codebook()
INT4 = torch.linspace(-1.0, 1.0, 16)  # the uniform 4-bit code on the same [-1, 1] (absmax int4)


@dataclass(frozen=True)
class QLoRAConfig(LoRAConfig):
    """The lora experiment's fields, plus the quantization and the QLoRA bars."""

    blocksize: int = 64  # weights per absmax constant (bitsandbytes' default for 4-bit)
    blocksize2: int = 256  # constants per second-level scale in double quantization
    double_quant: bool = True
    n_error_weights: int = 65536  # N(0, 1) weights for the NF4 vs int4 comparison
    max_nf4_int4_mse_ratio: float = 1.0  # NF4's squared error / uniform int4's, on normal weights: NF4 lower
    max_gap_to_lora: float = 0.05  # LoRA's exact match minus QLoRA's
    min_qlora_accuracy: float = 0.8
    min_quantized_base_accuracy: float = 0.9  # NF4 base on its own task, before any fine-tuning

    RANGES = {**LoRAConfig.RANGES, "blocksize": ">= 2", "blocksize2": ">= 1", "n_error_weights": ">= 64",
              "max_nf4_int4_mse_ratio": "> 0", "max_gap_to_lora": "[0, 1]", "min_qlora_accuracy": "[0, 1]",
              "min_quantized_base_accuracy": "[0, 1]"}

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize % 2:
            raise ValueError("blocksize must be even: two 4-bit codes share a byte")

    @classmethod
    def toy(cls) -> QLoRAConfig:
        return cls()

    @classmethod
    def full(cls) -> QLoRAConfig:
        return cls(n_items=5, base_steps=100, finetune_steps=60, eval_size=2048, n_error_weights=1 << 20)


# ---------------------------------------------------------------------------------------------------
# Kernels


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization to the 16-value NF4 code (``from modules.qlora import NF4``).

    weight: any shape, numel divisible by blocksize; read flat, in blocks of ``blocksize`` values.
    Returns (codes, absmax): codes (numel,) uint8 in 0..15, the index of the NF4 value nearest to
    w / c; absmax (numel / blocksize,) float32, c = max |w| of each block. Nearest = compare with the
    15 midpoints between consecutive code values (torch.bucketize), as bitsandbytes does; a block of
    zeros (c = 0) maps to the exact 0 code.
    """
    blocks = weight.detach().float().reshape(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-1, 1)
    midpoints = (NF4[:-1] + NF4[1:]) / 2
    codes = torch.bucketize(scaled, midpoints)  # (n_blocks, blocksize) in 0..15
    return codes.reshape(-1).to(torch.uint8), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   blocksize: int = 64) -> torch.Tensor:
    """The inverse lookup: w_hat = absmax[block] * NF4[code], float32, reshaped to ``shape`` (NF4 as in nf4_quantize).

    codes (numel,) uint8 in 0..15; absmax (numel / blocksize,) float; |w - w_hat| <= c * max_gap / 2."""
    values = NF4[codes.long()].reshape(-1, blocksize) * absmax.float()[:, None]
    return values.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# The same mechanics for any code (the uniform int4 comparison), packing, double quantization


def quantize_blocks(weight: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = weight.detach().float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-1, 1)
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).reshape(-1).to(torch.uint8), absmax


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    return (code[codes.long()].reshape(-1, blocksize) * absmax[:, None]).reshape(-1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order): (n,) -> (n / 2,)."""
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)


def double_quantize(absmax: torch.Tensor, blocksize2: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scale per block of blocksize2, fp32 offset): c - mean(c), absmax-scaled to
    [-127, 127] per block and rounded. The last block may be shorter."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    padded = F.pad(centred, (0, (-n) % blocksize2)).reshape(-1, blocksize2)
    scale = padded.abs().amax(dim=1)
    q = torch.round(padded / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None] * 127)
    return q.reshape(-1)[:n].to(torch.int8), scale, offset


def double_dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, blocksize2: int = 256) -> torch.Tensor:
    n = q.numel()
    padded = F.pad(q.float(), (0, (-n) % blocksize2)).reshape(-1, blocksize2)
    return (padded * scale[:, None] / 127).reshape(-1)[:n] + offset


# ---------------------------------------------------------------------------------------------------
# A frozen NF4 linear layer and model surgery


class NF4Linear(nn.Module):
    """A linear layer stored as packed NF4 codes plus (double-)quantized block constants, all buffers:
    nothing here is a parameter, so nothing here can be trained. ``weight`` dequantizes on each access."""

    def __init__(self, linear: nn.Linear, blocksize: int = 64, blocksize2: int = 256, double_quant: bool = True,
                 quantize_fn: Callable = nf4_quantize, dequantize_fn: Callable = nf4_dequantize):
        super().__init__()
        self.shape, self.blocksize, self.blocksize2 = tuple(linear.weight.shape), blocksize, blocksize2
        self.double_quant, self.dequantize_fn = double_quant, dequantize_fn
        codes, absmax = quantize_fn(linear.weight, blocksize)
        self.register_buffer("packed", pack_nibbles(codes))
        if double_quant:
            q, scale, offset = double_quantize(absmax, blocksize2)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_scale", scale)
            self.register_buffer("absmax_offset", offset.reshape(1))
        else:
            self.register_buffer("absmax", absmax)

    def block_constants(self) -> torch.Tensor:
        if self.double_quant:
            return double_dequantize(self.absmax_q, self.absmax_scale, self.absmax_offset[0], self.blocksize2)
        return self.absmax

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize_fn(unpack_nibbles(self.packed), self.block_constants(), self.shape, self.blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def linear_layers(model: Transformer) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every projection in the blocks: q, k, v, o, gate, up, down (not lm_head)."""
    out = []
    for block in model.layers:
        for parent, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (block.mlp, ("gate_proj", "up_proj", "down_proj"))):
            out += [(parent, name) for name in names]
    return out


def quantize_model(model: Transformer, cfg: QLoRAConfig, quantize_fn: Callable = nf4_quantize,
                   dequantize_fn: Callable = nf4_dequantize) -> list[NF4Linear]:
    """Replace every block projection by an NF4Linear, in place (embeddings, norms and lm_head stay in
    float, as QLoRA keeps them); freeze everything left. Returns the quantized layers."""
    done = []
    for parent, name in linear_layers(model):
        layer = NF4Linear(getattr(parent, name), cfg.blocksize, cfg.blocksize2, cfg.double_quant, quantize_fn,
                          dequantize_fn)
        setattr(parent, name, layer)
        done.append(layer)
    for p in model.parameters():
        p.requires_grad_(False)
    return done


def nf4_bytes(numel: int, blocksize: int = 64, blocksize2: int = 256, double_quant: bool = True) -> int:
    """Bytes of one NF4 tensor by the layout: numel / 2 code bytes; per block one fp32 constant, or with
    double quantization one int8 code, plus one fp32 scale per blocksize2 constants and one fp32 offset."""
    n_blocks = -(-numel // blocksize)
    if not double_quant:
        return numel // 2 + 4 * n_blocks
    return numel // 2 + n_blocks + 4 * (-(-n_blocks // blocksize2)) + 4


def bits_per_parameter(numel: int, blocksize: int = 64, blocksize2: int = 256, double_quant: bool = True) -> float:
    return 8 * nf4_bytes(numel, blocksize, blocksize2, double_quant) / numel


# ---------------------------------------------------------------------------------------------------
# Memory of fine-tuning a published 7B model (weights + gradients + optimizer states; no activations)

LLAMA2_7B = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008)


@dataclass(frozen=True)
class MemoryRow:
    method: str
    weights_gb: float
    trainable: int
    trainable_state_gb: float  # gradients + fp32 master copy + Adam m, v of the trainable parameters

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.trainable_state_gb


def finetune_memory(r: int = 64, model: dict = LLAMA2_7B) -> list[MemoryRow]:
    """Full fine-tuning (mixed-precision Adam: bf16 weights 2 + bf16 gradients 2 + fp32 master 4 + m 4
    + v 4 = 16 bytes per parameter), LoRA (bf16 base, 2 bytes) and QLoRA (NF4 block projections,
    bf16 embeddings, norms and lm_head), both with rank-r adapters on every block projection (the QLoRA
    recipe) holding bf16 weights and 16 bytes of training state each. Decimal GB; activations excluded."""
    from modules.transformer import ModelConfig, count_parameters

    cfg = ModelConfig(**model)
    total = count_parameters(cfg)
    d, hd, H, K, L = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers
    shapes = [(H * hd, d), (K * hd, d), (K * hd, d), (d, H * hd), (cfg.d_ff, d), (cfg.d_ff, d), (d, cfg.d_ff)]
    linear = L * sum(o * i for o, i in shapes)
    adapter = L * sum(r * (o + i) for o, i in shapes)
    nf4 = L * sum(nf4_bytes(o * i) for o, i in shapes)
    gb = 1e9
    return [MemoryRow("full fine-tuning", 2 * total / gb, total, 14 * total / gb),
            MemoryRow(f"LoRA r={r}", (2 * total + 2 * adapter) / gb, adapter, 14 * adapter / gb),
            MemoryRow(f"QLoRA r={r}", (nf4 + 2 * (total - linear) + 2 * adapter) / gb, adapter, 14 * adapter / gb)]


# ---------------------------------------------------------------------------------------------------
# The experiment


@dataclass
class QLoRAResult:
    base: Transformer
    eval_batch: tuple[torch.Tensor, torch.Tensor]
    base_task_accuracy: float  # float base model on its own task
    quantized_base_task_accuracy: float  # the same model with NF4 projections
    lora: FinetuneRun
    qlora: FinetuneRun
    codes_before: list[torch.Tensor]  # packed codes of the QLoRA model's layers before fine-tuning
    codes_after: list[torch.Tensor]


def run(cfg: QLoRAConfig, generator: torch.Generator, *, nf4_quantize: Callable = nf4_quantize,
        nf4_dequantize: Callable = nf4_dequantize, on_progress: Callable[[float], None] | None = None) -> QLoRAResult:
    """The lora experiment's base model, then LoRA on the float base and LoRA on its NF4 copy (QLoRA),
    same rank, lr, steps and data stream."""
    progress = on_progress or (lambda fraction: None)
    base = train_base(cfg, generator)
    base.eval()
    eval_batch = task_batch(cfg, cfg.new_task, cfg.eval_size, generator)
    own_task = task_batch(cfg, cfg.base_task, cfg.eval_size, generator)
    progress(0.4)
    state = generator.get_state()
    lora = finetune(base, cfg, torch.Generator().set_state(state), eval_batch, rank=cfg.rank)
    progress(0.7)
    captured: list[torch.Tensor] = []
    quantized_acc: list[float] = []

    def quantize(model: Transformer) -> None:
        layers = quantize_model(model, cfg, nf4_quantize, nf4_dequantize)
        captured.extend(layer.packed.clone() for layer in layers)
        quantized_acc.append(exact_match(model, cfg, cfg.base_task, own_task))

    qlora = finetune(base, cfg, torch.Generator().set_state(state), eval_batch, rank=cfg.rank, adapt=quantize,
                     forward_fn=lora_forward)
    inner = [layer.base if isinstance(layer, LoRALinear) else layer
             for layer in (getattr(parent, name) for parent, name in linear_layers(qlora.model))]
    after = [layer.packed for layer in inner if isinstance(layer, NF4Linear)]
    return QLoRAResult(base, eval_batch, exact_match(base, cfg, cfg.base_task, own_task), quantized_acc[0], lora, qlora,
                       captured, after)
