"""Audit of the megatron module (day 14): TP, DP / ZeRO and PP on real gloo process groups, each
against one process computing the same thing; the memory ledger and the bubble against their formulas."""
from __future__ import annotations

import torch

from llmaudit.audit import Audit, kernel, max_error
from modules import megatron as M
from modules.megatron import sizing as S

TOL = 1e-10  # float64: sharded and unsharded sums differ by round-off only


def _linear_example() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 3, 8, generator=g, dtype=M.DTYPE),
            "weight": torch.randn(6, 8, generator=g, dtype=M.DTYPE), "rank": 1, "world_size": 2}


def _row_example() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x_shard": torch.randn(2, 3, 4, generator=g, dtype=M.DTYPE),
            "weight": torch.randn(6, 8, generator=g, dtype=M.DTYPE), "rank": 1, "world_size": 2}


KERNELS = [
    kernel(M.column_parallel_linear, example=_linear_example,
           hint="split W (out, in) by OUTPUT rows: rank r takes W[r*out/t:(r+1)*out/t] and returns x @ W_r^T."),
    kernel(M.row_parallel_linear, example=_row_example,
           hint="split W (out, in) by INPUT columns: W[:, r*in/t:(r+1)*in/t]; the result is a partial sum."),
    kernel(M.zero_memory_per_rank, example=lambda: {"n_params": 1000, "world_size": 4, "stage": 2},
           hint="ZeRO-1 shards only the K = 12 optimizer bytes; the 2 + 2 of weights and grads stay whole."),
    kernel(M.one_f_one_b_schedule, example=lambda: {"n_stages": 3, "n_micro": 5},
           hint="stage s warms up with p - 1 - s forwards, then alternates F and B, then drains the Bs."),
]

megatron = Audit("megatron", day=14,
                 title="Parallel training: Megatron TP, ZeRO DP and 1F1B PP on torch.distributed",
                 config=M.MegatronConfig, kernels=KERNELS, formulas=M.FORMULAS)


@megatron.fixture
def setup(cfg, g):
    """The tiny Llama's float64 weights and one batch of the toy sequences."""
    tokens, targets = M.make_batch(cfg, g)
    return M.make_weights(cfg, g), tokens, targets


# ---- tensor parallelism -------------------------------------------------------------------------

def _shapes(cfg, g):
    for t in sorted({1, 2, *cfg.world_sizes}):
        yield t, torch.randn(3, 5, 4 * t, generator=g, dtype=M.DTYPE), torch.randn(2 * t, 4 * t, generator=g,
                                                                                    dtype=M.DTYPE)


@megatron.check("< 1e-12", hint="rank r owns OUTPUT rows r*out/t .. (r+1)*out/t of the (out, in) weight.")
def column_shards_concatenate_to_the_full_product(column_parallel_linear, cfg, g):
    """Column-parallel needs no communication: each rank computes whole output features, and laying
    the ranks' outputs side by side gives x W^T."""
    return [max_error(torch.cat([column_parallel_linear(x, w, r, t) for r in range(t)], dim=-1), x @ w.T)
            for t, x, w in _shapes(cfg, g)]


@megatron.check("< 1e-12", hint="rank r owns INPUT columns r*in/t .. (r+1)*in/t and returns a partial sum.")
def row_partial_sums_add_up_to_the_full_product(row_parallel_linear, cfg, g):
    """Row-parallel splits the contraction: each rank's x_r W_r^T is a partial sum, and the all-reduce
    (Megatron's g) adds them up to x W^T."""
    return [max_error(sum(row_parallel_linear(x.chunk(t, dim=-1)[r], w, r, t) for r in range(t)), x @ w.T)
            for t, x, w in _shapes(cfg, g)]


@megatron.fixture(cost=10)
def tensor_parallel(cfg, setup, column_parallel_linear, row_parallel_linear):
    weights, tokens, targets = setup
    return {w: M.run_tensor_parallel(cfg, w, weights, tokens, targets, column_parallel_linear, row_parallel_linear)
            for w in cfg.world_sizes}


@megatron.check(f"< {TOL}", hint="g must all-reduce the row-parallel partial sums in the forward.")
def tensor_parallel_logits_match_one_process(tensor_parallel):
    """Every rank of the TP group ends with the same logits as the unsplit model: the f/g operators
    make the sharded computation exact, not an approximation."""
    return [r.logit_error for r in tensor_parallel.values()]


@megatron.check(f"< {TOL}", hint="f must all-reduce the input gradient in the backward (identity forward).")
def tensor_parallel_gradients_match_one_process(tensor_parallel):
    """Sharded weights get exactly their slice of the full gradient and replicated ones (norms,
    embedding) the whole gradient on every rank, because f sums the input gradients of the shards."""
    return [r.grad_error for r in tensor_parallel.values()]


@megatron.check({"forward": "== 2", "backward": "== 2"}, hint="one g after attention and one after the MLP; "
                "f's all-reduce happens only in the backward.")
def two_all_reduces_per_layer_forward_and_backward(tensor_parallel, cfg):
    """Megatron's layer costs exactly 2 all-reduces forward (after attention, after the MLP) and 2
    backward (f before each block), counted on every rank."""
    return {"forward": [n / cfg.n_layers for r in tensor_parallel.values() for n in r.forward_all_reduces],
            "backward": [n / cfg.n_layers for r in tensor_parallel.values() for n in r.backward_all_reduces]}


@megatron.check("< 1e-12", hint="all-reduce the (B, T, d) activations, not the weights or the full logits.")
def all_reduce_payload_is_the_activation_size(tensor_parallel, cfg):
    """Each TP all-reduce carries one (b, s, h) activation, so a layer moves 4 x 2(t-1)/t x bsh
    elements per rank (ring): bandwidth grows with batch x sequence, not with the weights."""
    errors = []
    for r in tensor_parallel.values():
        sizes = [n for rank in r.all_reduce_bytes for n in rank]
        errors += [abs(n - r.expected_payload) / r.expected_payload for n in sizes] or [float("inf")]
    return errors


# ---- data parallelism and ZeRO ------------------------------------------------------------------

@megatron.fixture(cost=20)
def zero(cfg, setup):
    weights, tokens, targets = setup
    return {w: M.run_zero(cfg, w, weights, tokens, targets) for w in cfg.world_sizes}


@megatron.check(f"< {TOL}", hint="average the all-reduced gradient by N (the loss is a mean per rank).")
def ddp_gradient_equals_full_batch_gradient(zero):
    """N ranks on 1/N of the batch each, gradients all-reduced and divided by N: exactly the full
    batch's gradient, which is why DDP is the same optimisation as one big GPU."""
    return [z.ddp_grad_error for z in zero.values()]


@megatron.check(f"< {TOL}", hint="every rank must apply the same averaged gradient with the same Adam state.")
def ddp_training_equals_one_process_adam(zero):
    """After several Adam steps the DDP ranks hold the parameters one process training on the full
    batch reaches (compared with a second, textbook Adam)."""
    return [z.ddp_vs_single_error for z in zero.values()]


@megatron.check(f"< {TOL}", hint="reduce-scatter the gradients, step your shard, all-gather the parameters.")
def zero_training_equals_ddp(zero):
    """ZeRO-1/2/3 only change who stores what: each rank updates its 1/N shard with the reduced
    gradient, so the parameters after training equal plain DDP's."""
    return [e for z in zero.values() for e in z.zero_vs_ddp_error.values()]


@megatron.check("< 1e-12", hint="stage 1: 4 Psi + K Psi/N; stage 2: 2 Psi + (2+K) Psi/N; stage 3: 16 Psi/N.")
def zero_memory_per_rank_matches_formula(zero, zero_memory_per_rank):
    """The bytes each rank really holds (element counts of its weights, gradients, master weights and
    Adam moments at mixed-precision widths) equal the ZeRO paper's per-stage formula."""
    errors = []
    for w, z in zero.items():
        for stage, per_rank in z.memory.items():
            want = zero_memory_per_rank(z.n_params[stage], w, stage)
            errors += [abs(b - want) / want for b in per_rank]
    return errors


@megatron.check("< 1e-9", hint="K = 12: fp32 master weights, m and v, 4 bytes each.")
def zero_memory_reproduces_paper_figure_1(zero_memory_per_rank):
    """ZeRO's Figure 1 (Psi = 7.5B, N = 64): 120, 31.4, 16.6 and 1.9 GB per GPU for DDP and stages
    1-3, i.e. 120, 31.40625, 16.640625 and 1.875 exactly."""
    want = [120.0, 31.40625, 16.640625, 1.875]
    return [abs(zero_memory_per_rank(7_500_000_000, 64, s) / 1e9 - gb) / gb for s, gb in enumerate(want)]


@megatron.check("< 1e-12", hint="with one rank there is nothing to shard: every stage is 16 bytes per parameter.")
def zero_memory_is_16_bytes_per_parameter_on_one_rank(zero_memory_per_rank):
    """Sharding over one rank changes nothing: all stages hold 2 + 2 + 12 = 16 bytes per parameter,
    and ZeRO-3 over N ranks holds exactly 1/N of that."""
    errors = [abs(zero_memory_per_rank(10**9, 1, s) / 16e9 - 1) for s in range(4)]
    return errors + [abs(zero_memory_per_rank(10**9, n, 3) * n / 16e9 - 1) for n in (2, 8, 64)]


@megatron.check("== 1", hint="free a unit's gathered parameters (p.data = empty) before gathering the next one.")
def zero3_gathers_one_unit_at_a_time(zero):
    """A ZeRO-3 rank holds the full parameters of one unit (the embedding, a block, or norm + lm_head)
    at a time, measured after every all-gather in forward and backward: its peak is the largest unit,
    not Psi, which is what lets a model larger than one GPU's memory train."""
    return [z.gathered_peak / z.largest_unit for z in zero.values()]


@megatron.check("== 1.5", hint="the forward freed each unit's parameters, so the backward must all-gather them "
                "again before recomputing it.")
def zero3_traffic_is_one_and_a_half_ddp(zero):
    """ZeRO-3 moves 3 Psi per step (all-gather in forward, all-gather again in backward, reduce-scatter of
    the gradients) where DDP's all-reduce moves 2 Psi: the ZeRO paper's 1.5x, the price of 16 Psi / N.
    Each stage's traffic is taken per element of its own padded buffers, so the ratio is exact."""
    return [(z.traffic(3) / z.n_params[3]) / (z.traffic(0) / z.n_params[0]) for z in zero.values()]


@megatron.check("<= max_loss_ratio", kind="outcome", hint="a ZeRO-3 rank must step with the full reduced gradient.")
def zero3_training_lowers_the_loss(zero):
    """The sharded run really trains: ZeRO-3's loss on the toy sequences falls over the Adam steps."""
    return [z.losses[3][-1] / z.losses[3][0] for z in zero.values()]


# ---- pipeline parallelism -----------------------------------------------------------------------

@megatron.fixture(cost=10)
def gpipe(cfg, setup):
    return {w: M.run_pipeline(cfg, w, *setup, M.gpipe_schedule(w, cfg.n_micro), "gpipe") for w in cfg.world_sizes}


@megatron.fixture(cost=10)
def one_f_one_b(cfg, setup, one_f_one_b_schedule):
    return {w: M.run_pipeline(cfg, w, *setup, one_f_one_b_schedule(w, cfg.n_micro), "1f1b")
            for w in cfg.world_sizes}


@megatron.check(f"< {TOL}", hint="scale each micro-batch's loss by 1/m and accumulate the gradients.")
def gpipe_gradients_match_one_process(gpipe):
    """Stages exchanging activations and their gradients by send / recv, m micro-batches accumulated:
    the same gradient (and loss) as the whole batch through the whole model."""
    return [max(r.grad_error, r.loss_error) for r in gpipe.values()]


@megatron.check(f"< {TOL}", hint="a backward must find its own forward's stashed activations (by micro index).")
def one_f_one_b_gradients_match_one_process(one_f_one_b):
    """1F1B only reorders the same forwards and backwards, so its gradients equal one process's."""
    return [max(r.grad_error, r.loss_error) for r in one_f_one_b.values()]


@megatron.check("== 1", hint="GPipe runs every forward before any backward.")
def gpipe_keeps_every_micro_batch_in_flight(gpipe, cfg):
    """GPipe stashes the activations of all m micro-batches on every stage (measured): its activation
    memory grows with m, which is what 1F1B fixes."""
    return [n / cfg.n_micro for r in gpipe.values() for n in r.in_flight]


@megatron.check("<= 1", hint="warm up with only p - 1 - s forwards before the first backward.")
def one_f_one_b_keeps_at_most_p_micro_batches_in_flight(one_f_one_b):
    """1F1B starts each backward as early as possible, so stage s holds at most p - s micro-batches
    (measured while executing): activation memory bounded by p, not m."""
    return [max(r.in_flight) / w for w, r in one_f_one_b.items()]


@megatron.check("< 1e-12", hint="bubble share of the total is (p-1)/(m+p-1); (p-1)/m is relative to the ideal.")
def pipeline_bubble_matches_formula(one_f_one_b, gpipe, one_f_one_b_schedule):
    """With equal forward and backward times both schedules idle (p-1)/(m+p-1) of the time: 1F1B
    saves activation memory, not bubble; only more micro-batches (or interleaving) shrink it."""
    errors = [abs(r.bubble - M.bubble_fraction(w, r_m)) for runs in (one_f_one_b, gpipe)
              for w, r in runs.items() for r_m in [len(r.timeline) // (2 * w)]]
    for p, m in [(2, 1), (3, 5), (4, 8), (8, 16)]:
        timeline = M.simulate_schedule(one_f_one_b_schedule(p, m), p, m)
        errors.append(abs(M.timeline_bubble(timeline, p) - M.bubble_fraction(p, m)))
    return errors


# ---- the calculator agrees with the model -------------------------------------------------------

@megatron.check("== 0", hint="count q, k, v, o, gate, up, down, two norms per layer, the final norm, and both "
                "embedding matrices unless tied.")
def sizing_counts_match_the_model_and_llama_2_7b(cfg):
    """`llmaudit calc` and the model agree: the closed-form count equals the parameters the tiny Llama
    really stores, and Llama-2-7B comes out at exactly 6,738,415,616."""
    from modules.transformer import Transformer, count_model_parameters

    built = count_model_parameters(Transformer(cfg.model_config()))
    return max(abs(S.count_params(S.spec_from_model_config(cfg.model_config())) - built),
               abs(S.count_params(S.preset("llama-2-7b")) - 6_738_415_616))


# ---- report -------------------------------------------------------------------------------------

def _gantt(timeline, n_stages) -> list[list[str]]:
    end = int(max(e for *_, e in timeline))
    rows = [[f"stage {s}"] + ["·"] * end for s in range(n_stages)]
    for s, kind, i, start, stop in timeline:
        for t in range(int(start), int(stop)):
            rows[s][1 + t] = f"{kind}{i}"
    return rows


@megatron.report
def curves(ctx, cfg, zero, gpipe, one_f_one_b, tensor_parallel):
    w = max(cfg.world_sizes)
    for name, runs in (("GPipe", gpipe), ("1F1B", one_f_one_b)):
        r = runs[w]
        ctx.table(f"{name} timeline, p = {w}, m = {cfg.n_micro} (F/B of micro-batch i, · idle)",
                  ["stage"] + [str(t) for t in range(int(max(e for *_, e in r.timeline)))], _gantt(r.timeline, w),
                  draw="gantt")
        ctx.scalar(f"{name} bubble (p={w}, m={cfg.n_micro})", r.bubble)
        ctx.scalar(f"{name} max in-flight micro-batches (p={w})", max(r.in_flight))
    labels = ["DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    for n, z in zero.items():
        ctx.series(f"memory/bytes_per_rank_N{n}", [z.memory[s][0] for s in range(4)], ticks=labels,
                   x_label="ZeRO stage", label=f"N = {n} ranks (measured)", y_label="bytes per rank",
                   title=f"Model-state bytes per rank, N = {n} ranks, Psi = {z.n_params[0]:,}", smooth=False,
                   key=n == w)
    z = zero[w]
    collectives = ["all_reduce", "reduce_scatter", "all_gather"]
    ctx.table(f"Collectives per step, N = {w} (elements of each buffer; traffic counts an all-reduce twice)",
              ["stage", "Psi (padded)", *collectives, "traffic / Psi", "traffic / DDP's"],
              [[label, z.n_params[s], *[z.comm_elements[s].get(c, 0) for c in collectives],
                z.traffic(s) / z.n_params[s], (z.traffic(s) / z.n_params[s]) / (z.traffic(0) / z.n_params[0])]
               for s, label in enumerate(labels)])
    ctx.scalar(f"ZeRO-3 peak gathered parameters (N={w}, Psi = {z.n_params[3]:,})", z.gathered_peak)
    ctx.scalar("TP max logit error", max(r.logit_error for r in tensor_parallel.values()))
    presets = [S.preset(name) for name in S.PRESETS]
    ctx.table("llmaudit calc: presets (training FLOPs at T = 4096; KV cache bf16)",
              ["model", "params", "16 Psi (GB)", "training GFLOPs / token", "KV bytes / token"],
              [[s.name, f"{S.count_params(s):,}", round(16 * S.count_params(s) / 1e9, 1),
                round(S.flops_per_token(s, 4096)["training"] / 1e9, 2), S.kv_cache(s)["bytes_per_token"]]
               for s in presets])
