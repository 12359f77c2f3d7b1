"""megatron: the launcher never hangs nor leaks processes, the kernels' properties, the sizing
arithmetic against published counts and against the transformer module, `llmaudit calc`, a user's
kernel reaching the forked ranks under `llmaudit check`, and a mutant per check."""
from __future__ import annotations

import contextlib
import json
import os
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import modules.megatron.megatron as MM
from llmaudit.cli import app
from modules import megatron as M
from modules.megatron import sizing as S
from modules.megatron.launch import WorldFailed, run_world
from modules.transformer import ModelConfig, Transformer, count_model_parameters, count_parameters, forward_flops, \
    kv_cache_bytes


def _children() -> list[int]:
    """Pids of this process's living children (zombies included), read from /proc."""
    me = str(os.getpid())
    kids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                kids.append(int(pid))
    return kids


# ---- the launcher --------------------------------------------------------------------------------

def _sum_ranks(rank, world_size):
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    return rank, x.item()


def _rank1_never_joins(rank, world_size):
    if rank == 1:
        time.sleep(60)
    dist.all_reduce(torch.ones(1))


def _sleeps(rank, world_size):
    time.sleep(60)


def _rank0_raises(rank, world_size):
    if rank == 0:
        raise ValueError("bad shard")
    dist.all_reduce(torch.ones(1))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_run_world_returns_every_rank_in_order(world_size):
    before = _children()
    assert run_world(world_size, _sum_ranks) == [(r, world_size * (world_size - 1) / 2) for r in range(world_size)]
    assert _children() == before


def test_a_hung_collective_fails_within_the_collective_timeout_and_leaves_no_process():
    before, start = _children(), time.monotonic()
    with pytest.raises(WorldFailed, match="rank 0 raised"):
        run_world(2, _rank1_never_joins, timeout_s=30, collective_timeout_s=1)
    assert time.monotonic() - start < 15
    assert _children() == before


def test_a_world_past_its_deadline_is_killed():
    before, start = _children(), time.monotonic()
    with pytest.raises(WorldFailed, match="deadline"):
        run_world(2, _sleeps, timeout_s=1)
    assert time.monotonic() - start < 10
    assert _children() == before


def test_a_raising_rank_names_its_error_and_stops_its_partners():
    before = _children()
    with pytest.raises(WorldFailed, match="rank 0 raised ValueError: bad shard"):
        run_world(2, _rank0_raises, timeout_s=30)
    assert _children() == before


# ---- kernels ------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(t=st.sampled_from([1, 2, 3, 4]), d_in=st.integers(1, 4), d_out=st.integers(1, 4), seed=st.integers(0, 99))
def test_column_and_row_parallel_recompose_the_product(t, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, d_in * t, generator=g, dtype=torch.float64)
    w = torch.randn(d_out * t, d_in * t, generator=g, dtype=torch.float64)
    col = torch.cat([M.column_parallel_linear(x, w, r, t) for r in range(t)], dim=-1)
    row = sum(M.row_parallel_linear(x.chunk(t, dim=-1)[r], w, r, t) for r in range(t))
    assert torch.allclose(col, x @ w.T, atol=1e-12) and torch.allclose(row, x @ w.T, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 8), m=st.integers(1, 16))
def test_one_f_one_b_is_valid_bounded_and_has_gpipes_bubble(p, m):
    schedule = M.one_f_one_b_schedule(p, m)
    timeline = M.simulate_schedule(schedule, p, m)
    assert [M.max_in_flight(ops) for ops in schedule] == [min(p - s, m) for s in range(p)]
    gpipe = M.simulate_schedule(M.gpipe_schedule(p, m), p, m)
    assert abs(M.timeline_bubble(timeline, p) - M.bubble_fraction(p, m)) < 1e-12
    assert abs(M.timeline_bubble(gpipe, p) - M.bubble_fraction(p, m)) < 1e-12


def test_simulate_schedule_rejects_broken_schedules():
    with pytest.raises(ValueError, match="deadlocks"):  # stage 0 waits for B0 before sending F1's input
        M.simulate_schedule([[("F", 0), ("B", 0), ("F", 1), ("B", 1)], [("F", 1), ("B", 1), ("F", 0), ("B", 0)]], 2, 2)
    with pytest.raises(ValueError, match="once"):
        M.simulate_schedule([[("F", 0), ("F", 0)]], 1, 1)
    with pytest.raises(ValueError, match="before its forward"):
        M.simulate_schedule([[("B", 0), ("F", 0)]], 1, 1)


@settings(max_examples=30, deadline=None)
@given(psi=st.integers(1, 10**12), n=st.integers(1, 1024))
def test_zero_memory_falls_with_the_stage_and_matches_the_general_formula(psi, n):
    got = [M.zero_memory_per_rank(psi, n, s) for s in range(4)]
    assert got == sorted(got, reverse=True) and got[0] == 16 * psi
    assert got == [S.zero_bytes(psi, n, s) for s in range(4)]


def test_adam_update_equals_torch_optim_adam():
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, generator=g, dtype=torch.float64))
    mine, m, v = p.detach().clone(), torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    opt = torch.optim.Adam([p], lr=0.05)
    for step in range(1, 6):
        grad = torch.randn(50, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        MM.adam_update(mine, grad, m, v, step, 0.05)
    assert (mine - p.detach()).abs().max() < 1e-13  # the same formula, up to the order of float ops


# ---- sizing -------------------------------------------------------------------------------------

PUBLISHED = {"llama-2-7b": 6_738_415_616, "gpt2": 124_439_808, "minimind2-small": 25_829_888,
             "minimind-3": 63_912_192}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_counts_equal_published_counts(name):
    assert S.count_params(S.preset(name)) == PUBLISHED[name]


@pytest.mark.parametrize("cfg", [ModelConfig(), ModelConfig(n_kv_heads=1, tie_embeddings=True),
                                 ModelConfig(vocab_size=100, d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, d_ff=80)])
def test_sizing_agrees_with_the_transformer_module(cfg):
    s = S.spec_from_model_config(cfg)
    assert S.count_params(s) == count_parameters(cfg) == count_model_parameters(Transformer(cfg))
    assert S.flops_per_token(s, 16)["forward"] * 16 == forward_flops(cfg, 16)
    assert S.kv_cache(s, seq_len=10)["total_bytes"] == kv_cache_bytes(cfg, 10)


def test_llama_2_70b_kv_cache_and_zero_figure_1():
    assert S.kv_cache(S.preset("llama-2-70b"), seq_len=4096)["bytes_per_token"] == 327_680
    assert [S.zero_bytes(7.5e9, 64, s) / 1e9 for s in range(4)] == [120.0, 31.40625, 16.640625, 1.875]


def test_calc_cli_params_json_and_config_file(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["calc", "params", "--preset", "llama-2-7b", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"][0]["total"] == 6_738_415_616
    path = tmp_path / "config.json"
    path.write_text(json.dumps(S.PRESETS["mistral-7b"]))
    r = runner.invoke(app, ["calc", "memory", "--config", str(path), "--dp", "8", "--zero", "3", "--json"])
    row = json.loads(r.stdout)["rows"][0]
    assert r.exit_code == 0 and row["bytes_per_gpu"] == 16 * 7_241_732_096 / 8
    r = runner.invoke(app, ["calc", "mfu", "--preset", "llama-2-7b"])
    assert r.exit_code == 2 and "--tokens-per-s" in r.stderr
    r = runner.invoke(app, ["calc", "params", "--preset", "llama2-7b"])
    assert r.exit_code == 2 and "llama-2-7b" in r.stderr


# ---- the audit, and a user's kernel in the forked ranks ----------------------------------------

def test_audit_passes_toy():
    result = audit_once("megatron", "toy", 0)
    assert result.passed, [(c.name, c.measured, c.error) for c in result.checks if not c.passed]


def test_report_draws_both_schedules_as_gantt_charts():
    """Each timeline is drawn; on every stage each micro-batch has one forward and one backward slot."""
    result = audit_once("megatron", "toy", 0)
    m = M.MegatronConfig.toy().n_micro
    drawn = {name: t for name, t in result.tables.items() if t.get("draw") == "gantt"}
    assert sorted(name.split()[0] for name in drawn) == ["1F1B", "GPipe"]
    for t in drawn.values():
        for row in t["rows"]:
            assert sorted(c for c in row[1:] if c != "·") == sorted([f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)])


@pytest.mark.slow
def test_audit_passes_full():
    result = audit_once("megatron", "full", 0)
    assert result.passed, [(c.name, c.measured, c.error) for c in result.checks if not c.passed]


def test_a_users_kernel_reaches_the_ranks_under_check(tmp_path):
    from llmaudit.practice import check_in_child

    good = tmp_path / "good.py"
    good.write_text("def row_parallel_linear(x_shard, weight, rank, world_size):\n"
                    "    n = weight.shape[1] // world_size\n"
                    "    return x_shard @ weight[:, rank * n:(rank + 1) * n].T\n")
    outcome = check_in_child("row_parallel_linear", good, "toy", [0], timeout_s=120)
    assert outcome.status == "done" and outcome.record.results[0].passed, outcome.message
    bad = tmp_path / "bad.py"  # right on rank 0, wrong on the others: only the world checks can see it
    bad.write_text("def row_parallel_linear(x_shard, weight, rank, world_size):\n"
                   "    n = weight.shape[1] // world_size\n"
                   "    return x_shard @ weight[:, :n].T\n")
    outcome = check_in_child("row_parallel_linear", bad, "toy", [0], timeout_s=120)
    failed = {c.name for c in outcome.record.results[0].checks if not c.passed}
    assert "tensor_parallel_logits_match_one_process" in failed, failed


def _no_reduce_forward(ctx, x, log):
    return x.clone()


def _extra_all_reduce_forward(ctx, x, log):
    ctx.log = log
    log.append(("forward", x.numel() * x.element_size()))
    y = x.clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def _padded_reduce_forward(ctx, x, log):
    y = torch.cat((x, torch.zeros_like(x)), dim=-1)
    log.append(("forward", y.numel() * y.element_size()))
    dist.all_reduce(y)
    return y[..., :x.shape[-1]]


def _no_reduce_backward(ctx, grad):
    return grad, None


def _undivided_gradients(grad, n, stage, shard, comm):
    dist.all_reduce(grad)
    return grad, (grad if stage == 0 else grad[shard])


def _no_bias_correction(param, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8):
    exp_avg.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)


def _sequential_schedule(n_stages, n_micro):
    return [[op for i in range(n_micro) for op in (("F", i), ("B", i))] for _ in range(n_stages)]


def _zero1_unsharded(n_params, world_size, stage, k_optimizer=12):
    return M.zero_memory_per_rank(n_params, 1 if stage == 1 else world_size, stage, k_optimizer)


_breakdown = S.params_breakdown
_stage_forward = MM._stage_forward
_gather_unit, _free_unit = MM._gather_unit, MM._free_unit


def _kept_for_backward(unit):
    """Free a ZeRO-3 unit only after its backward (the forward runs under no_grad, the recompute does not)."""
    if torch.is_grad_enabled():
        _free_unit(unit)


def _gather_unless_held(unit, shapes, param_shard, n, comm):
    if next(unit.parameters()).numel() == 0:
        _gather_unit(unit, shapes, param_shard, n, comm)


def _all(*patches):
    """One Mutant patch made of several."""
    def enter():
        stack = contextlib.ExitStack()
        for patch in patches:
            stack.enter_context(patch())
        return stack
    return enter


def _breakdown_without_final_norm(s):
    parts = dict(_breakdown(s))
    parts["total"] -= s.d_model
    return parts


MUTANTS = [
    Mutant("column_shards_concatenate_to_the_full_product", "strided rows",
           kernels={"column_parallel_linear": lambda x, weight, rank, world_size: x @ weight[rank::world_size].T}),
    Mutant("row_partial_sums_add_up_to_the_full_product", "always the first block",
           kernels={"row_parallel_linear": lambda x_shard, weight, rank, world_size:
                    x_shard @ weight[:, :weight.shape[1] // world_size].T}),
    Mutant("tensor_parallel_logits_match_one_process", "g does not all-reduce",
           patch=lambda: mock.patch.object(MM.ReduceFromTensorParallel, "forward", staticmethod(_no_reduce_forward))),
    Mutant("tensor_parallel_gradients_match_one_process", "f does not all-reduce the gradient",
           patch=lambda: mock.patch.object(MM.CopyToTensorParallel, "backward", staticmethod(_no_reduce_backward))),
    Mutant("two_all_reduces_per_layer_forward_and_backward", "an extra all-reduce in f's forward",
           patch=lambda: mock.patch.object(MM.CopyToTensorParallel, "forward",
                                           staticmethod(_extra_all_reduce_forward))),
    Mutant("all_reduce_payload_is_the_activation_size", "padded all-reduce",
           patch=lambda: mock.patch.object(MM.ReduceFromTensorParallel, "forward",
                                           staticmethod(_padded_reduce_forward))),
    Mutant("ddp_gradient_equals_full_batch_gradient", "sum not mean", patch=patched(MM, "reduce_gradients",
                                                                                   _undivided_gradients)),
    Mutant("ddp_training_equals_one_process_adam", "no bias correction",
           patch=patched(MM, "adam_update", _no_bias_correction)),
    Mutant("zero_training_equals_ddp", "rank owns its neighbour's shard",
           patch=patched(MM, "owned_slice", lambda rank, n, padded: slice(((rank + 1) % n) * padded // n,
                                                                           ((rank + 1) % n + 1) * padded // n))),
    Mutant("zero_memory_per_rank_matches_formula", "ZeRO-1 shards nothing",
           kernels={"zero_memory_per_rank": _zero1_unsharded}),
    Mutant("zero_memory_reproduces_paper_figure_1", "K = 8",
           kernels={"zero_memory_per_rank": lambda n_params, world_size, stage, k_optimizer=12:
                    M.zero_memory_per_rank(n_params, world_size, stage, 8)}),
    Mutant("zero_memory_is_16_bytes_per_parameter_on_one_rank", "ZeRO-3 divides by N + 1",
           kernels={"zero_memory_per_rank": lambda n_params, world_size, stage, k_optimizer=12:
                    M.zero_memory_per_rank(n_params, world_size + (stage == 3), stage, k_optimizer)}),
    Mutant("zero3_gathers_one_unit_at_a_time", "the whole model as one unit",
           patch=patched(MM, "fsdp_units", lambda model: [(model, model)])),
    Mutant("zero3_gathers_one_unit_at_a_time", "units never freed",
           patch=patched(MM, "_free_unit", lambda unit: None)),
    Mutant("zero3_traffic_is_one_and_a_half_ddp", "parameters kept from forward for backward",
           patch=_all(patched(MM, "_free_unit", _kept_for_backward), patched(MM, "_gather_unit", _gather_unless_held))),
    Mutant("zero3_training_lowers_the_loss", "lr 1e-9", overrides={"lr": "1e-9"}),
    Mutant("gpipe_gradients_match_one_process", "micro-batch losses not scaled by 1/m",
           patch=patched(MM, "_stage_forward", lambda model, stage, p, x, targets, n_micro:
                         _stage_forward(model, stage, p, x, targets, 1))),
    Mutant("one_f_one_b_gradients_match_one_process", "stash popped last-in first-out",
           patch=patched(MM, "pop_stash", lambda stash, micro: stash.pop(max(stash)))),
    Mutant("gpipe_keeps_every_micro_batch_in_flight", "gpipe runs 1F1B",
           patch=patched(MM, "gpipe_schedule", M.one_f_one_b_schedule)),
    Mutant("one_f_one_b_keeps_at_most_p_micro_batches_in_flight", "all forwards first",
           kernels={"one_f_one_b_schedule": M.gpipe_schedule}),
    Mutant("pipeline_bubble_matches_formula", "one micro-batch at a time",
           kernels={"one_f_one_b_schedule": _sequential_schedule}),
    Mutant("sizing_counts_match_the_model_and_llama_2_7b", "final norm forgotten",
           patch=patched(S, "params_breakdown", _breakdown_without_final_norm)),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("megatron", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("megatron", MUTANTS)
