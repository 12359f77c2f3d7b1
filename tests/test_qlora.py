"""QLoRA: the NF4 codebook and kernels, packing, double quantization, the memory formula, and the audit's mutants."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.qlora import qlora as M

HALF_GAP = float((M.NF4[1:] - M.NF4[:-1]).max()) / 2


# --- the code and the kernels ---------------------------------------------------------------------------


def test_codebook_equals_bitsandbytes_table():
    published = torch.tensor(M.NF4_BNB)
    assert (M.NF4 - published).abs().max().item() <= 1.2e-7  # float32 rounding of the quantiles: 2 ulp at most
    assert M.NF4[7] == 0 and M.NF4[0] == -1 and M.NF4[-1] == 1
    assert (M.NF4 > 0).sum() == 8 and (M.NF4 < 0).sum() == 7
    assert HALF_GAP == pytest.approx((1 - 0.6961928009986877) / 2, abs=1e-7)  # the widest gap: -1 to -0.696


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([32, 64, 128]), st.integers(1, 6), st.floats(1e-3, 1e3))
def test_roundtrip_error_is_within_half_the_widest_gap(seed, blocksize, n_blocks, scale):
    w = torch.randn(n_blocks, blocksize, generator=torch.Generator().manual_seed(seed)) * scale
    codes, absmax = M.nf4_quantize(w, blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == (w.numel(),) and int(codes.max()) <= 15
    w_hat = M.nf4_dequantize(codes, absmax, tuple(w.shape), blocksize)
    bound = w.abs().amax(dim=1, keepdim=True) * HALF_GAP * (1 + 1e-6)
    assert ((w - w_hat).abs() <= bound).all()
    assert torch.equal(w_hat.abs().amax(dim=1), absmax)  # the block's largest value maps to +-1 exactly


def test_zero_block_and_sign_symmetry_of_the_extremes():
    w = torch.zeros(2, 64)
    w[1, 3], w[1, 5] = -2.0, 2.0
    codes, absmax = M.nf4_quantize(w, 64)
    assert (codes[:64] == 7).all() and absmax[0] == 0  # zeros go to the exact 0 code
    assert codes[64 + 3] == 0 and codes[64 + 5] == 15
    assert torch.equal(M.nf4_dequantize(codes, absmax, (2, 64), 64), w)


def test_pack_nibbles_puts_the_first_code_in_the_high_nibble():
    codes = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    packed = M.pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0xF0] and torch.equal(M.unpack_nibbles(packed), codes)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 1000))
def test_double_quantization_error_is_small(seed, n):
    absmax = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.1 + 0.01
    q, scale, offset = M.double_quantize(absmax, 256)
    back = M.double_dequantize(q, scale, offset, 256)
    step = scale.max() / 127
    assert q.dtype == torch.int8 and scale.numel() == -(-n // 256)
    assert (back - absmax).abs().max() <= step / 2 + 1e-7


def test_bits_per_parameter_from_the_layout():
    n = 4096 * 4096
    assert M.bits_per_parameter(n, double_quant=False) == 4.5
    assert M.bits_per_parameter(n) == 4 + 8 / 64 + 32 / (64 * 256) + 32 / n  # the last term: one fp32 offset
    assert round(M.bits_per_parameter(n), 3) == 4.127


def test_nf4_linear_buffers_equal_the_formula_and_nothing_trains():
    layer = M.NF4Linear(torch.nn.Linear(256, 128, bias=False))
    assert not list(layer.parameters())
    nbytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert nbytes == M.nf4_bytes(256 * 128) == 256 * 128 // 2 + 512 + 4 * 2 + 4


def test_seven_b_memory_table():
    full, lora, qlora = M.finetune_memory()
    assert full.trainable == 6_738_415_616  # Llama-2-7B
    assert full.total_gb == pytest.approx(16 * 6_738_415_616 / 1e9)
    assert lora.trainable == 32 * 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r=64, every projection
    assert qlora.weights_gb < lora.weights_gb / 3 and qlora.total_gb < lora.total_gb < full.total_gb


# --- the audit ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_result():
    return audit_once("qlora", "toy", 0)


def test_audit_passes_toy(toy_result):
    assert toy_result.passed, [(c.name, c.measured) for c in toy_result.checks if not c.passed] or toy_result.error
    assert {c.kind for c in toy_result.checks} == {"invariant", "outcome"}


def test_same_seed_same_result(toy_result):
    assert audit_once("qlora", "toy", 0).deterministic_dict() == toy_result.deterministic_dict()


# --- mutants --------------------------------------------------------------------------------------------


def symmetric_codebook(offset: float = 0.9677083) -> torch.Tensor:
    """8 positive and 8 negative quantiles: no exact 0."""
    half = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    values = torch.cat([half, -half]).float().sort().values
    return values / values.max()


def one_absmax_for_the_tensor(weight, blocksize=64):
    """Scales every block by the tensor's absmax instead of its own."""
    flat = weight.detach().float().reshape(-1, blocksize)
    top = flat.abs().max()
    codes, _ = M.nf4_quantize(flat / top * 0.999999, blocksize)
    return codes, torch.full((flat.shape[0],), float(top))


def floor_to_code(weight, blocksize=64):
    """Rounds down to the code value below instead of to the nearest one."""
    blocks = weight.detach().float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax[:, None]).clamp(-1, 1)
    codes = (torch.bucketize(scaled, M.NF4, right=True) - 1).clamp(0, 15)
    return codes.reshape(-1).to(torch.uint8), absmax


def int4_quantize(weight, blocksize=64):
    return M.quantize_blocks(weight, M.INT4, blocksize)


def int4_dequantize(codes, absmax, shape, blocksize=64):
    return M.dequantize_blocks(codes, absmax, M.INT4, blocksize).reshape(shape)


def dequantize_sign_lost(codes, absmax, shape, blocksize=64):
    return M.nf4_dequantize(codes, absmax, shape, blocksize).abs()


def quantize_attention_only(model, cfg, quantize_fn=M.nf4_quantize, dequantize_fn=M.nf4_dequantize):
    """Leaves the MLP projections in float32 (and trainable)."""
    done = []
    for parent, name in M.linear_layers(model):
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            layer = M.NF4Linear(getattr(parent, name), cfg.blocksize, cfg.blocksize2, cfg.double_quant, quantize_fn,
                                dequantize_fn)
            setattr(parent, name, layer)
            done.append(layer)
    return done


MUTANTS = [
    Mutant("nf4_codebook_matches_bitsandbytes", "symmetric code without 0",
           patch=lambda: mock.patch.object(M, "nf4_codebook", symmetric_codebook)),
    Mutant("dequantize_error_within_half_the_largest_gap", "one absmax for the whole tensor",
           {"nf4_quantize": one_absmax_for_the_tensor}),
    Mutant("quantizer_picks_the_nearest_code", "rounds down to a code", {"nf4_quantize": floor_to_code}),
    Mutant("nf4_beats_uniform_int4_on_normal_weights", "uniform int4 levels",
           {"nf4_quantize": int4_quantize, "nf4_dequantize": int4_dequantize}),
    Mutant("memory_matches_the_layout_formula", "codes not packed two per byte",
           patch=lambda: mock.patch.multiple(M, pack_nibbles=lambda codes: codes, unpack_nibbles=lambda packed: packed)),
    Mutant("base_stays_frozen_in_nf4", "MLP left in float",
           patch=lambda: mock.patch.object(M, "quantize_model", quantize_attention_only)),
    Mutant("quantized_base_keeps_its_task", "sign lost in dequantize", {"nf4_dequantize": dequantize_sign_lost}),
    Mutant("qlora_matches_lora", "sign lost in dequantize", {"nf4_dequantize": dequantize_sign_lost}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("qlora", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("qlora", MUTANTS)
