"""Audit of QLoRA (day 15): the NF4 codebook, the blockwise error bound, NF4 vs int4, the 4.127-bit
layout, a base that stays frozen in NF4, and QLoRA against LoRA on the copy -> swap task."""
from __future__ import annotations

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules.lora import lora as L
from modules.qlora import qlora as M


def _quantize_example() -> dict:
    return {"weight": torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), "blocksize": 64}


def _dequantize_example() -> dict:
    codes, absmax = M.nf4_quantize(**_quantize_example())
    return {"codes": codes, "absmax": absmax, "shape": (4, 32), "blocksize": 64}


KERNELS = [
    kernel(M.nf4_quantize, example=_quantize_example,
           hint="per block of 64: c = max |w|, then the index of the NF4 value nearest to w / c "
                "(bucketize against the midpoints, not the code values)."),
    kernel(M.nf4_dequantize, example=_dequantize_example,
           hint="w_hat = absmax[block] * NF4[code]: block i covers the flat elements 64 i .. 64 i + 63."),
]

qlora = Audit("qlora", day=15, title="QLoRA: NF4 with double quantization under a LoRA that trains",
              config=M.QLoRAConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _weights(g: torch.Generator, n: int) -> torch.Tensor:
    """Normal weights with a few outliers (x 8), as trained matrices have: n values."""
    w = torch.randn(n, generator=g)
    w[torch.randint(n, (max(1, n // 500),), generator=g)] *= 8
    return w


# ---- the code, the quantizer, the error ------------------------------------------------------------

@qlora.check({"vs_bitsandbytes": "< 2.5e-7", "structure_errors": "== 0"},
             hint="8 positive quantiles from linspace(0.9677083, 0.5, 9), 7 negative from 8 points, an exact 0, "
                  "sorted, divided by the max.")
def nf4_codebook_matches_bitsandbytes():
    """NF4 is the normal-quantile code of bitsandbytes: 8 positive and 7 negative values and an exact 0,
    in [-1, 1]; recomputed from Phi^-1 it equals the published table to float32 rounding (2 ulp)."""
    code = M.nf4_codebook()
    published = torch.tensor(M.NF4_BNB, dtype=torch.float64)
    structure = int((code > 0).sum() != 8) + int((code < 0).sum() != 7) + int((code == 0).sum() != 1) \
        + int(code[0] != -1) + int(code[-1] != 1) + int(not bool((code[1:] > code[:-1]).all()))
    return {"vs_bitsandbytes": max_error(code.double(), published), "structure_errors": structure}


@qlora.check("<= 1.000001", hint="divide by the block's absmax before looking up; multiply it back after.")
def dequantize_error_within_half_the_largest_gap(nf4_quantize, nf4_dequantize, cfg, g):
    """Each w / c lands in [-1, 1] and goes to its nearest code value, so |w - w_hat| is at most half
    the widest gap of the code times the block's absmax c (ratio to that bound measured, outliers included)."""
    w = _weights(g, 64 * cfg.blocksize).reshape(64, cfg.blocksize)
    codes, absmax = nf4_quantize(w, cfg.blocksize)
    w_hat = nf4_dequantize(codes, absmax, tuple(w.shape), cfg.blocksize)
    half_gap = float((M.NF4[1:] - M.NF4[:-1]).max()) / 2
    bound = (w.abs().amax(dim=1, keepdim=True) * half_gap).expand_as(w)
    return ((w - w_hat).abs() / bound).amax()


@qlora.check({"not_nearest": "== 0", "code_values_not_exact": "== 0"},
             hint="nearest means comparing with the midpoints between code values; the code values themselves "
                  "(times c) must come back exactly.")
def quantizer_picks_the_nearest_code(nf4_quantize, nf4_dequantize, cfg, g):
    """The chosen code is the argmin of |w / c - NF4_j| (brute force over all 16), and a block made of
    code values times c round-trips exactly."""
    w = _weights(g, 16 * cfg.blocksize).reshape(16, cfg.blocksize)
    codes, absmax = nf4_quantize(w, cfg.blocksize)
    scaled = w / w.abs().amax(dim=1, keepdim=True)
    distance = (scaled.reshape(-1, 1) - M.NF4).abs()  # (n, 16)
    chosen = distance.gather(1, codes.long().reshape(-1, 1)).squeeze(1)
    wrong = int((chosen > distance.min(dim=1).values + 1e-6).sum())
    exact = M.NF4[torch.randint(16, (4, cfg.blocksize), generator=g)] * 0.37
    exact[:, 0] = 0.37  # each block's absmax is 0.37 (the code's 1.0)
    back = nf4_dequantize(*nf4_quantize(exact, cfg.blocksize), tuple(exact.shape), cfg.blocksize)
    return {"not_nearest": wrong, "code_values_not_exact": int((back != exact).sum())}


@qlora.check("< max_nf4_int4_mse_ratio",
             hint="the same blocks and absmax, only the 16 levels differ: quantiles instead of an even grid.")
def nf4_beats_uniform_int4_on_normal_weights(nf4_quantize, nf4_dequantize, cfg, g):
    """Normal weights crowd near 0, where NF4's quantile levels are dense and an even 4-bit grid is
    sparse: NF4's mean squared error is lower (ratio NF4 / int4 measured, same blocks of 64)."""
    w = torch.randn(cfg.n_error_weights // cfg.blocksize, cfg.blocksize, generator=g)
    nf4 = nf4_dequantize(*nf4_quantize(w, cfg.blocksize), tuple(w.shape), cfg.blocksize)
    int4 = M.dequantize_blocks(*M.quantize_blocks(w, M.INT4, cfg.blocksize), M.INT4, cfg.blocksize).reshape(w.shape)
    mse_nf4, mse_int4 = (w - nf4).pow(2).mean().item(), (w - int4).pow(2).mean().item()
    return measure(mse_nf4 / mse_int4, f"MSE NF4 {mse_nf4:.3g}, int4 {mse_int4:.3g}")


# ---- the layout: 4.127 bits, a base frozen in NF4 ---------------------------------------------------

@qlora.check({"bytes_minus_formula": "== 0", "bits_256x1024": "in [4.1269, 4.1271]",
              "absmax_relative_error": "< 0.01"},
             hint="two codes per byte; with double quantization one int8 per block plus one fp32 per 256 blocks.")
def memory_matches_the_layout_formula(nf4_quantize, cfg, g):
    """The quantized projections' buffers take exactly numel/2 + n_blocks + 4 (n_blocks/256) + 4 bytes:
    4.127 bits per weight on a 256 x 1024 matrix (4.5 without double quantization), and the 8-bit
    block constants stay within 1 % of the fp32 ones."""
    model = M.Transformer(L.model_config(cfg), generator=g)
    layers = M.quantize_model(model, cfg, nf4_quantize)
    measured = sum(b.numel() * b.element_size() for layer in layers for b in layer.buffers())
    formula = sum(M.nf4_bytes(layer.shape[0] * layer.shape[1], cfg.blocksize, cfg.blocksize2, cfg.double_quant)
                  for layer in layers)
    linear = torch.nn.Linear(1024, 256, bias=False)  # (256, 1024): 4096 blocks, 16 second-level blocks
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=g)
    big = M.NF4Linear(linear, cfg.blocksize, cfg.blocksize2, cfg.double_quant, nf4_quantize)
    bits = 8 * sum(b.numel() * b.element_size() for b in big.buffers()) / linear.weight.numel()
    absmax = linear.weight.abs().reshape(-1, cfg.blocksize).amax(dim=1)
    rel = ((big.block_constants() - absmax).abs() / absmax).max().item()
    return measure({"bytes_minus_formula": measured - formula, "bits_256x1024": bits, "absmax_relative_error": rel},
                   f"{measured} bytes for {sum(x.shape[0] * x.shape[1] for x in layers)} weights")


@qlora.fixture(cost=20)
def trained(ctx, cfg, g, nf4_quantize, nf4_dequantize):
    """The copy base, then LoRA on the float base and LoRA on its NF4 copy (QLoRA)."""
    return M.run(cfg, g, nf4_quantize=nf4_quantize, nf4_dequantize=nf4_dequantize, on_progress=ctx.progress)


@qlora.check({"changed_code_bytes": "== 0", "float_projections_left": "== 0", "trainable_non_adapter": "== 0"},
             hint="quantize every block projection into buffers; only LoRA's A and B are parameters that train.")
def base_stays_frozen_in_nf4(trained):
    """After QLoRA fine-tuning every projection is still NF4 and its codes are bit for bit those of
    before: gradients flow through the dequantized weights into A and B only."""
    model = trained.qlora.model
    changed = sum(int((a != b).sum()) for a, b in zip(trained.codes_before, trained.codes_after))
    changed += abs(len(trained.codes_before) - len(trained.codes_after))
    float_left = sum(isinstance(getattr(p, n).base if isinstance(getattr(p, n), L.LoRALinear) else getattr(p, n),
                                torch.nn.Linear) for p, n in M.linear_layers(model))
    lora_ids = {id(q) for m in L.adapters(model) for q in (m.lora_A, m.lora_B)}
    other = sum(q.numel() for q in model.parameters() if q.requires_grad and id(q) not in lora_ids)
    return {"changed_code_bytes": changed, "float_projections_left": float_left, "trainable_non_adapter": other}


@qlora.check(">= min_quantized_base_accuracy", kind="outcome",
             hint="a wrong block layout or a lost absmax scrambles the weights: the base forgets its task.")
def quantized_base_keeps_its_task(trained):
    """NF4 with blocks of 64 barely moves the weights: the quantized base still copies strings."""
    return measure(trained.quantized_base_task_accuracy, f"float base {trained.base_task_accuracy:.3f}")


@qlora.check({"gap": "<= max_gap_to_lora", "qlora": ">= min_qlora_accuracy"}, kind="outcome",
             hint="LoRA must wrap the dequantized NF4 weight: h = dequant(W) x + s B A x.")
def qlora_matches_lora(trained):
    """LoRA on the NF4 base learns the swap as well as LoRA on the float base (same rank, lr, data):
    the adapters absorb the quantization error while they learn."""
    gap = trained.lora.accuracy - trained.qlora.accuracy
    return measure({"gap": gap, "qlora": trained.qlora.accuracy},
                   f"LoRA {trained.lora.accuracy:.3f}, QLoRA {trained.qlora.accuracy:.3f}")


@qlora.report
def curves(ctx, trained, cfg):
    ctx.series("train/loss_lora", [h["loss"] for h in trained.lora.history], x_label="fine-tuning step",
               label="LoRA loss (float base)", y_label="loss per answer token (nats)", group="loss")
    ctx.series("train/loss_qlora", [h["loss"] for h in trained.qlora.history], x_label="fine-tuning step",
               label="QLoRA loss (NF4 base)", y_label="loss per answer token (nats)", group="loss", key=True)
    ctx.scalar("float base on its own task", trained.base_task_accuracy)
    ctx.scalar("NF4 base on its own task", trained.quantized_base_task_accuracy)
    ctx.scalar("LoRA exact match", trained.lora.accuracy)
    ctx.scalar("QLoRA exact match", trained.qlora.accuracy)
    ctx.scalar("bits per weight, 4096 x 4096, double quantization", M.bits_per_parameter(4096 ** 2))
    ctx.scalar("bits per weight, 4096 x 4096, no double quantization", M.bits_per_parameter(4096 ** 2, double_quant=False))
    rows = M.finetune_memory()
    ctx.table("Llama-2-7B fine-tuning memory (GB, no activations): formula, adapters r=64 on every projection",
              ["method", "weights", "trainable", "grads + Adam", "total"],
              [[r.method, round(r.weights_gb, 2), r.trainable, round(r.trainable_state_gb, 2), round(r.total_gb, 2)]
               for r in rows])
