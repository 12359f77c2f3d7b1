"""Megatron: tensor, data (ZeRO) and pipeline parallelism on real torch.distributed process groups.

    TP (Megatron)  Y = X A,  A = [A_1 .. A_t] split by output columns (column-parallel, no talk);
                   Z = Y B = sum_r Y_r B_r, B split by input rows (row-parallel, one all-reduce g).
                   f = identity forward / all-reduce backward before a column-parallel block;
                   g = all-reduce forward / identity backward after the row-parallel one:
                   2 all-reduces per layer forward (attention, MLP) and 2 backward.
    DP / ZeRO      model states with mixed-precision Adam: 2 (w) + 2 (g) + K = 12 (fp32 w, m, v) bytes
                   per parameter; per rank 16 Psi -> 4 Psi + 12 Psi/N -> 2 Psi + 14 Psi/N -> 16 Psi/N.
                   ZeRO-3 all-gathers each unit's parameters in forward and again in backward, then
                   reduce-scatters its gradient: 3 Psi per step against DDP's all-reduce of 2 Psi.
    PP             stages of consecutive layers, activations sent point to point; GPipe (all forwards,
                   then all backwards) keeps m micro-batches in flight, 1F1B at most p; both idle
                   (p - 1) / (m + p - 1) of the time with equal forward and backward costs.

Builds on: transformer (the tiny Llama's blocks, weights and kernels). Every experiment runs on a
gloo process group of forked ranks (launch.py) and is compared with one process computing the same
thing. Deviations: float64 everywhere so sharded and unsharded results agree to round-off; the
mixed-precision widths (2 / 2 / 12 bytes) are applied to measured element counts, not stored;
embedding and lm_head are replicated under TP (Megatron splits the vocabulary too); ZeRO-3 recomputes
every unit in backward (activation checkpointing at unit boundaries) and never prefetches or overlaps
a gather with compute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from modules.megatron.launch import run_world
from modules.transformer import ModelConfig, Transformer, apply_rope, causal_mask, expand_kv_heads, rms_norm, \
    softmax_last_dim

DTYPE = torch.float64
MIXED_PRECISION_BYTES = {"params": 2, "grads": 2, "master": 4, "exp_avg": 4, "exp_avg_sq": 4}
TP_SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FORMULAS = [
    ("Column-parallel", r"$XA = [XA_1, \ldots, XA_t],\ A_r \in \mathbb{R}^{d \times n/t}$"),
    ("Row-parallel", r"$YB = \sum_{r=1}^{t} Y_r B_r,\ B_r \in \mathbb{R}^{n/t \times d}$"),
    ("TP traffic per layer", r"$4 \times 2\frac{t-1}{t}\,bsh$ elements (2 all-reduces fwd, 2 bwd)"),
    ("ZeRO per rank", r"$16\Psi \to 4\Psi+\frac{12\Psi}{N} \to 2\Psi+\frac{14\Psi}{N} \to \frac{16\Psi}{N}$"),
    ("Pipeline bubble", r"$\frac{(p-1)(t_f+t_b)}{(m+p-1)(t_f+t_b)} = \frac{p-1}{m+p-1}$"),
]


@dataclass(frozen=True)
class MegatronConfig:
    """Configuration of the megatron experiments: the model, the batch, the worlds, the training."""

    world_sizes: tuple[int, ...] = (2,)  # every experiment runs once per world size
    vocab_size: int = 32
    d_model: int = 32
    n_layers: int = 2  # divisible by every world size (pipeline stages)
    n_heads: int = 8  # divisible by every world size (tensor parallel heads)
    n_kv_heads: int = 4  # GQA; divisible by every world size
    d_ff: int = 64
    seq_len: int = 8
    batch_size: int = 8  # divisible by every world size and by n_micro
    n_micro: int = 4  # pipeline micro-batches m
    train_steps: int = 10  # Adam steps of the DDP / ZeRO runs
    lr: float = 0.05
    collective_timeout_s: float = 10.0  # a collective waiting longer raises in its rank
    world_timeout_s: float = 60.0  # the parent kills a world still running after this
    max_loss_ratio: float = 0.5  # closed loop: ZeRO-3's last loss / first loss at most this (sweep: toy
    #                              seeds 0-19 reach 0.10-0.42, full seeds 0-4 0.31-0.39)

    RANGES = {
        "world_sizes": ">= 1", "vocab_size": ">= 4", "d_model": ">= 8", "n_layers": ">= 1", "n_heads": ">= 1",
        "n_kv_heads": ">= 1",
        "d_ff": ">= 1", "seq_len": ">= 2", "batch_size": ">= 1", "n_micro": ">= 1", "train_steps": ">= 2",
        "lr": "> 0", "collective_timeout_s": "> 0", "world_timeout_s": "> 0",
        "max_loss_ratio": "> 0",
    }

    def __post_init__(self):
        for w in self.world_sizes:
            if w < 1 or self.n_layers % w or self.n_heads % w or self.n_kv_heads % w or self.d_ff % w \
                    or self.batch_size % w:
                raise ValueError(f"world size {w} must divide n_layers, n_heads, n_kv_heads, d_ff and batch_size")
        if self.batch_size % self.n_micro:
            raise ValueError(f"n_micro={self.n_micro} must divide batch_size={self.batch_size}")
        self.model_config()  # raises for impossible head layouts

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_ff=self.d_ff,
                           max_seq_len=self.seq_len)

    @classmethod
    def toy(cls) -> MegatronConfig:
        return cls()

    @classmethod
    def full(cls) -> MegatronConfig:
        return cls(world_sizes=(2, 4), n_layers=4, n_micro=8, max_loss_ratio=0.45)


# ---------------------------------------------------------------------------------------------------
# Kernels


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of y = x W^T when W is split by OUTPUT features (Megatron's column-parallel A).

    x: (..., in); weight: (out, in) the full matrix as nn.Linear stores it, out divisible by world_size.
    Rank r owns the rows W_r = W[r*out/t : (r+1)*out/t] (t = world_size) and returns x @ W_r^T, shape
    (..., out/t). No communication: concatenating the ranks' outputs along the last axis gives x W^T.
    For q/k/v this gives each rank whole heads (rows are grouped by head), for gate/up a slice of d_ff.
    """
    n = weight.shape[0] // world_size
    return x @ weight[rank * n:(rank + 1) * n].T


def row_parallel_linear(x_shard: torch.Tensor, weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s PARTIAL SUM of y = x W^T when W is split by INPUT features (row-parallel B).

    x_shard: (..., in/t) the rank's slice of the input (what its column-parallel layer produced);
    weight: (out, in) the full matrix, in divisible by t = world_size. Rank r owns the columns
    W_r = W[:, r*in/t : (r+1)*in/t] and returns x_shard @ W_r^T, shape (..., out). The sum over ranks
    sum_r x_r W_r^T = x W^T is the all-reduce (Megatron's g) that the caller does.
    """
    n = weight.shape[1] // world_size
    return x_shard @ weight[:, rank * n:(rank + 1) * n].T


def zero_memory_per_rank(n_params: int, world_size: int, stage: int, k_optimizer: int = 12) -> float:
    """Model-state bytes per data-parallel rank under ZeRO stage 0 (plain DDP), 1, 2 or 3.

    Mixed-precision Adam keeps 2 bytes of fp16/bf16 weights, 2 of gradients and K = 12 of optimizer
    state (fp32 master weight, m, v) per parameter (Psi = n_params, N = world_size):
        stage 0: (2 + 2 + K) Psi            stage 1: 4 Psi + K Psi / N  (optimizer states sharded)
        stage 2: 2 Psi + (2 + K) Psi / N     stage 3: (2 + 2 + K) Psi / N (parameters sharded too)
    Activations are not counted.
    """
    psi, n, k = float(n_params), float(world_size), float(k_optimizer)
    if stage == 0:
        return (4 + k) * psi
    if stage == 1:
        return 4 * psi + k * psi / n
    if stage == 2:
        return 2 * psi + (2 + k) * psi / n
    if stage == 3:
        return (4 + k) * psi / n
    raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")


def one_f_one_b_schedule(n_stages: int, n_micro: int) -> list[list[tuple[str, int]]]:
    """The 1F1B (PipeDream-Flush) order of work on each pipeline stage.

    Returns one list per stage s of ("F", i) / ("B", i) for the forward / backward of micro-batch i.
    Stage s first runs w = min(p - 1 - s, m) warm-up forwards, then alternates one forward and one
    backward until every forward is done, then runs the remaining backwards (cool-down). So stage s
    holds at most w + 1 <= p micro-batches' activations at once (GPipe holds all m), for the same
    bubble (p - 1) / (m + p - 1) when forward and backward take equal time.
    """
    schedule = []
    for s in range(n_stages):
        warmup = min(n_stages - 1 - s, n_micro)
        ops = [("F", i) for i in range(warmup)]
        f, b = warmup, 0
        while f < n_micro:
            ops += [("F", f), ("B", b)]
            f, b = f + 1, b + 1
        ops += [("B", i) for i in range(b, n_micro)]
        schedule.append(ops)
    return schedule


# ---------------------------------------------------------------------------------------------------
# Pipeline schedules as timelines (pure Python)


def gpipe_schedule(n_stages: int, n_micro: int) -> list[list[tuple[str, int]]]:
    """GPipe: every stage runs all m forwards, then all m backwards."""
    return [[("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)] for _ in range(n_stages)]


def bubble_fraction(n_stages: int, n_micro: int) -> float:
    """Idle share of a pipeline's wall time with equal forward/backward costs: (p - 1) / (m + p - 1)."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


def simulate_schedule(schedule: Any, n_stages: int, n_micro: int, t_f: float = 1.0,
                      t_b: float = 1.0) -> list[tuple[int, str, int, float, float]]:
    """Play a schedule with forward cost t_f and backward cost t_b: (stage, "F"/"B", micro, start, end)
    per op. F(s, i) waits for F(s-1, i), B(s, i) for B(s+1, i); each stage runs its ops in its order.
    Raises ValueError for a schedule that misses or repeats an op, runs B(i) before F(i), or deadlocks."""
    want = sorted([("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)])
    if not isinstance(schedule, (list, tuple)) or len(schedule) != n_stages:
        raise ValueError(f"a schedule is one list of ops per stage ({n_stages}), got {schedule!r:.60}")
    for s, ops in enumerate(schedule):
        ops = [tuple(op) for op in ops] if isinstance(ops, (list, tuple)) else ops
        if not isinstance(ops, list) or sorted(ops) != want:
            raise ValueError(f"stage {s} must run F and B of each of the {n_micro} micro-batches once, got {ops!r:.80}")
        if any(ops.index(("B", i)) < ops.index(("F", i)) for i in range(n_micro)):
            raise ValueError(f"stage {s} runs a backward before its forward")
    done: dict[tuple[int, str, int], float] = {}
    clock, pos, timeline = [0.0] * n_stages, [0] * n_stages, []
    while len(timeline) < 2 * n_micro * n_stages:
        progressed = False
        for s in range(n_stages):
            if pos[s] == 2 * n_micro:
                continue
            kind, i = schedule[s][pos[s]]
            dep = (s - 1, "F", i) if kind == "F" else (s + 1, "B", i)
            if 0 <= dep[0] < n_stages and dep not in done:
                continue
            start = max(clock[s], done.get(dep, 0.0))
            clock[s] = done[(s, kind, i)] = start + (t_f if kind == "F" else t_b)
            timeline.append((s, kind, i, start, clock[s]))
            pos[s], progressed = pos[s] + 1, True
        if not progressed:
            raise ValueError(f"the schedule deadlocks: stages wait at ops {pos}")
    return timeline


def timeline_bubble(timeline: list[tuple[int, str, int, float, float]], n_stages: int) -> float:
    """Idle share of the stages' time between the first start and the last end."""
    makespan = max(end for *_, end in timeline) - min(start for *_, start, _ in timeline)
    busy = sum(end - start for *_, start, end in timeline)
    return 1.0 - busy / (n_stages * makespan)


def max_in_flight(ops: list[tuple[str, int]]) -> int:
    """The most micro-batches whose forward has run and backward has not, over a stage's order."""
    live = most = 0
    for kind, _ in ops:
        live += 1 if kind == "F" else -1
        most = max(most, live)
    return most


# ---------------------------------------------------------------------------------------------------
# The toy data and the single-process reference


def make_batch(cfg: MegatronConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences t_{k+1} = t_k + step (mod V), random start and step per row: (inputs, next tokens)."""
    start = torch.randint(cfg.vocab_size, (cfg.batch_size, 1), generator=g)
    step = torch.randint(1, 4, (cfg.batch_size, 1), generator=g)
    seq = (start + step * torch.arange(cfg.seq_len + 1)) % cfg.vocab_size  # (B, T + 1)
    return seq[:, :-1], seq[:, 1:]


def make_weights(cfg: MegatronConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The tiny Llama's float64 state dict (HF names without the "model." prefix)."""
    model = Transformer(cfg.model_config(), generator=g).to(DTYPE)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_model(cfg: MegatronConfig, weights: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(cfg.model_config()).to(DTYPE)
    model.load_state_dict(weights)
    return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def single_process_grads(cfg: MegatronConfig, weights: dict, tokens: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and parameter gradients of the mean next-token loss, in one process."""
    model = build_model(cfg, weights)
    logits = model(tokens)
    lm_loss(logits, targets).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------
# Tensor parallelism: Megatron's f and g operators and the sharded Llama block


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity in the forward; all-reduce of the input gradient in the backward."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        ctx.log.append(("backward", grad.numel() * grad.element_size()))
        dist.all_reduce(grad)
        return grad, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: all-reduce of the partial sums in the forward; identity in the backward."""

    @staticmethod
    def forward(ctx, x, log):
        x = x.clone()
        log.append(("forward", x.numel() * x.element_size()))
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def tp_forward(cfg: MegatronConfig, w: dict[str, torch.Tensor], tokens: torch.Tensor, rank: int, t: int,
               column_fn: Callable, row_fn: Callable, log: list) -> torch.Tensor:
    """The tiny Llama on rank ``rank`` of ``t``: q/k/v and gate/up column-parallel (whole heads per
    rank), o and down row-parallel, norms, embedding and lm_head replicated. Returns (B, T, V) logits."""
    mc = cfg.model_config()
    B, T = tokens.shape
    hd, heads, kv_heads = mc.head_dim, mc.n_heads // t, mc.n_kv_heads // t  # this rank's heads
    positions = torch.arange(T)
    x = F.embedding(tokens, w["embed_tokens.weight"])  # (B, T, d)
    for i in range(mc.n_layers):
        p = f"layers.{i}."
        h = CopyToTensorParallel.apply(rms_norm(x, w[p + "input_layernorm.weight"], mc.norm_eps), log)
        q = column_fn(h, w[p + "self_attn.q_proj.weight"], rank, t).view(B, T, heads, hd).transpose(1, 2)
        k = column_fn(h, w[p + "self_attn.k_proj.weight"], rank, t).view(B, T, kv_heads, hd).transpose(1, 2)
        v = column_fn(h, w[p + "self_attn.v_proj.weight"], rank, t).view(B, T, kv_heads, hd).transpose(1, 2)
        qk = apply_rope(torch.cat((q, k), dim=1), positions, mc.rope_theta)
        q, k = qk[:, :heads], qk[:, heads:]
        k, v = expand_kv_heads(k, heads // kv_heads), expand_kv_heads(v, heads // kv_heads)  # (B, h, T, hd)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~causal_mask(T, T), float("-inf"))
        out = (softmax_last_dim(scores) @ v).transpose(1, 2).reshape(B, T, heads * hd)  # this rank's heads
        x = x + ReduceFromTensorParallel.apply(row_fn(out, w[p + "self_attn.o_proj.weight"], rank, t), log)
        h = CopyToTensorParallel.apply(rms_norm(x, w[p + "post_attention_layernorm.weight"], mc.norm_eps), log)
        a = F.silu(column_fn(h, w[p + "mlp.gate_proj.weight"], rank, t)) * column_fn(h, w[p + "mlp.up_proj.weight"],
                                                                                     rank, t)
        x = x + ReduceFromTensorParallel.apply(row_fn(a, w[p + "mlp.down_proj.weight"], rank, t), log)
    return F.linear(rms_norm(x, w["norm.weight"], mc.norm_eps), w["lm_head.weight"])


def _tp_rank(rank: int, t: int, cfg: MegatronConfig, weights: dict, tokens: torch.Tensor, targets: torch.Tensor,
             column_fn: Callable, row_fn: Callable) -> dict:
    w = {k: v.clone().requires_grad_() for k, v in weights.items()}
    log: list = []
    logits = tp_forward(cfg, w, tokens, rank, t, column_fn, row_fn, log)
    lm_loss(logits, targets).backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in w.items()}
    return {"logits": logits.detach(), "grads": grads, "log": log}


@dataclass
class TensorParallelResult:
    world_size: int
    logit_error: float  # max |logits - single process| over ranks
    grad_error: float  # max |grad - single process| (sharded weights: the sum over ranks)
    forward_all_reduces: list[int]  # per rank
    backward_all_reduces: list[int]
    all_reduce_bytes: list[list[int]]  # per rank, the payload of each all-reduce
    expected_payload: int  # B * T * d * 8 bytes


def run_tensor_parallel(cfg: MegatronConfig, world_size: int, weights: dict, tokens: torch.Tensor,
                        targets: torch.Tensor, column_fn: Callable = column_parallel_linear,
                        row_fn: Callable = row_parallel_linear) -> TensorParallelResult:
    ref_logits, ref_grads = single_process_grads(cfg, weights, tokens, targets)
    ranks = run_world(world_size, _tp_rank, cfg, weights, tokens, targets, column_fn, row_fn,
                      timeout_s=cfg.world_timeout_s, collective_timeout_s=cfg.collective_timeout_s)
    logit_error = max((r["logits"] - ref_logits).abs().max().item() for r in ranks)
    grad_error = 0.0
    for name, ref in ref_grads.items():
        if any(s in name for s in TP_SHARDED):
            got = [sum(r["grads"][name] for r in ranks)]
        else:
            got = [r["grads"][name] for r in ranks]
        grad_error = max([grad_error] + [(gr - ref).abs().max().item() for gr in got])
    return TensorParallelResult(
        world_size, logit_error, grad_error,
        [sum(ph == "forward" for ph, _ in r["log"]) for r in ranks],
        [sum(ph == "backward" for ph, _ in r["log"]) for r in ranks],
        [[nb for _, nb in r["log"]] for r in ranks],
        tokens.numel() * cfg.d_model * torch.finfo(DTYPE).bits // 8)


# ---------------------------------------------------------------------------------------------------
# Data parallelism: DDP and ZeRO-1/2 on one flat parameter buffer, ZeRO-3 on one per FSDP unit


def adam_update(param, grad, exp_avg, exp_avg_sq, step: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """torch.optim.Adam's update (no weight decay), in place, on any slice of the parameters."""
    exp_avg.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    bias1, bias2 = 1 - betas[0] ** step, 1 - betas[1] ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias1)


def textbook_adam_step(param, grad, m, v, step: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """Adam as the paper writes it: m_hat / (sqrt(v_hat) + eps), a second implementation of adam_update
    (torch.optim.Adam is avoided here: constructing it imports torch._dynamo, seconds of CPU)."""
    m.mul_(betas[0]).add_((1 - betas[0]) * grad)
    v.mul_(betas[1]).add_((1 - betas[1]) * grad * grad)
    m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
    param -= lr * m_hat / (v_hat.sqrt() + eps)


def _set_flat(model, flat: torch.Tensor, shapes: list[torch.Size]) -> None:
    offset = 0
    for p, shape in zip(model.parameters(), shapes):
        p.data = flat[offset:offset + shape.numel()].view(shape).clone()
        offset += shape.numel()


def owned_slice(rank: int, n: int, padded: int) -> slice:
    """The part of the flat buffer whose optimizer state (and, from ZeRO-2 on, gradient) rank owns."""
    return slice(rank * padded // n, (rank + 1) * padded // n)


def reduce_gradients(grad: torch.Tensor, n: int, stage: int, shard: slice, comm: list):
    """Average the ranks' flat gradients: all-reduce for DDP (every rank updates every parameter), a
    reduce-scatter from ZeRO-1 on (a rank updates only its shard, so it needs only that shard's
    average: 2 Psi of traffic with the parameters' all-gather, as DDP's all-reduce). ZeRO-1 still holds
    its whole local gradient buffer; ZeRO-2/3 keep only the shard. Returns (held, owned)."""
    if stage == 0:
        dist.all_reduce(grad)
        comm.append(("all_reduce", grad.numel()))
        grad /= n
        return grad, grad
    owned = torch.empty(shard.stop - shard.start, dtype=grad.dtype)
    dist.reduce_scatter(owned, list(grad.chunk(n)))
    comm.append(("reduce_scatter", grad.numel()))
    owned /= n
    return (grad if stage == 1 else owned), owned


def _ledger(held: dict[str, list[torch.Tensor]]) -> dict[str, int]:
    """Bytes per role of the tensors a rank holds, at mixed-precision widths."""
    return {role: MIXED_PRECISION_BYTES[role] * sum(t.numel() for t in tensors) for role, tensors in held.items()}


def _zero_rank(rank: int, n: int, cfg: MegatronConfig, weights: dict, tokens, targets, stages) -> dict:
    return {stage: (_zero3_stage(rank, n, cfg, weights, tokens, targets) if stage == 3
                    else _zero_stage(rank, n, cfg, weights, tokens, targets, stage)) for stage in stages}


def _zero_stage(rank: int, n: int, cfg: MegatronConfig, weights: dict, tokens, targets, stage: int) -> dict:
    """Train ``cfg.train_steps`` Adam steps with DDP (stage 0) or ZeRO-1/2 on this rank's batch slice;
    every rank holds the whole model's parameters."""
    model = build_model(cfg, weights)
    shapes = [p.shape for p in model.parameters()]
    psi = sum(p.numel() for p in model.parameters())
    padded = -(-psi // n) * n  # the flat buffer splits into N equal shards
    shard = owned_slice(rank, n, padded)
    flat = torch.zeros(padded, dtype=DTYPE)
    flat[:psi] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    owned = flat if stage == 0 else flat[shard].clone()  # the fp32 master copy this rank updates
    exp_avg, exp_avg_sq = torch.zeros_like(owned), torch.zeros_like(owned)
    rows = slice(rank * cfg.batch_size // n, (rank + 1) * cfg.batch_size // n)
    losses, first_grad, ledger, comm = [], None, None, []
    for step in range(1, cfg.train_steps + 1):
        loss = lm_loss(model(tokens[rows]), targets[rows])
        model.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.zeros(padded, dtype=DTYPE)
        grad[:psi] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        grad_held, grad_owned = reduce_gradients(grad, n, stage, shard, comm)
        grad = None  # stage 2 keeps only its shard
        if step == 1:
            first_grad = grad_held.clone()
            ledger = _ledger({"params": [flat], "grads": [grad_held], "master": [owned],
                              "exp_avg": [exp_avg], "exp_avg_sq": [exp_avg_sq]})
        adam_update(owned, grad_owned, exp_avg, exp_avg_sq, step, cfg.lr)
        if stage > 0:  # everyone needs the full updated parameters again
            parts = [torch.empty(padded // n, dtype=DTYPE) for _ in range(n)]
            dist.all_gather(parts, owned)
            comm.append(("all_gather", padded))
            flat = torch.cat(parts)
        _set_flat(model, flat, shapes)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / n)
    return {"psi": padded, "ledger": ledger, "first_grad": first_grad, "shards": [flat[shard].clone()],
            "sizes": [psi], "losses": losses, "comm": comm}


def fsdp_units(model: Transformer) -> list[tuple[torch.nn.Module, Callable]]:
    """The tiny Llama cut into FSDP units, in forward order, each (module holding its parameters, its
    forward): the embedding (token ids -> x), each block (x -> x), the final norm + lm_head (x -> logits).
    Their parameters, unit after unit, are the model's parameters in the model's order."""
    blocks = [(layer, lambda x, layer=layer: layer(x, torch.arange(x.shape[1]))) for layer in model.layers]
    head = torch.nn.ModuleList([model.norm, model.lm_head])
    return [(model.embed_tokens, model.embed_tokens), *blocks, (head, lambda x: model.lm_head(model.norm(x)))]


def _gather_unit(unit: torch.nn.Module, shapes: list[torch.Size], param_shard: torch.Tensor, n: int,
                 comm: list) -> None:
    """All-gather a unit's parameter shards into its full parameters."""
    parts = [torch.empty_like(param_shard) for _ in range(n)]
    dist.all_gather(parts, param_shard)
    comm.append(("all_gather", n * param_shard.numel()))
    _set_flat(unit, torch.cat(parts), shapes)


def _free_unit(unit: torch.nn.Module) -> None:
    """Drop a unit's full parameters and gradients (FSDP resizes their storage to 0)."""
    for p in unit.parameters():
        p.grad = None
        p.data = torch.empty(0, dtype=DTYPE)


def _zero3_stage(rank: int, n: int, cfg: MegatronConfig, weights: dict, tokens, targets) -> dict:
    """Train ``cfg.train_steps`` Adam steps with ZeRO-3 as FSDP runs it: each unit's parameters, fp32
    master copy, Adam moments and gradient live as 1/N shards of its own flat buffer; forward and
    backward all-gather one unit at a time and free it after use, and the backward recomputes each unit
    from its saved input (activation checkpointing at unit boundaries)."""
    model = build_model(cfg, weights)
    units = fsdp_units(model)
    shapes = [[p.shape for p in unit.parameters()] for unit, _ in units]
    sizes = [sum(s.numel() for s in unit_shapes) for unit_shapes in shapes]
    padded = [-(-size // n) * n for size in sizes]  # each unit's flat buffer splits into N equal shards
    masters = []  # the fp32 master shards this rank updates, one per unit
    for (unit, _), size, unit_padded in zip(units, sizes, padded):
        flat = torch.zeros(unit_padded, dtype=DTYPE)
        flat[:size] = torch.cat([p.detach().reshape(-1) for p in unit.parameters()])
        masters.append(flat[owned_slice(rank, n, unit_padded)].clone())
        _free_unit(unit)
    param_shards = [m.clone() for m in masters]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(m) for m in masters], [torch.zeros_like(m) for m in masters]
    rows = slice(rank * cfg.batch_size // n, (rank + 1) * cfg.batch_size // n)
    losses, ledger, comm, peak = [], None, [], 0

    def gather(u: int) -> int:
        _gather_unit(units[u][0], shapes[u], param_shards[u], n, comm)
        return sum(p.numel() for p in model.parameters())  # every full parameter this rank holds now

    for step in range(1, cfg.train_steps + 1):
        inputs, x = [], tokens[rows]
        with torch.no_grad():  # no graph: only each unit's input is kept, for the backward to recompute
            for u, (unit, forward) in enumerate(units):
                peak = max(peak, gather(u))
                inputs.append(x)
                x = forward(x)
                _free_unit(unit)
        loss = lm_loss(x, targets[rows])
        grad_shards = [None] * len(units)
        for u in reversed(range(len(units))):  # the parameters were freed: gather them again
            unit, forward = units[u]
            peak = max(peak, gather(u))
            x = inputs[u].requires_grad_() if u > 0 else inputs[u]  # token ids take no gradient
            out = forward(x)
            if u == len(units) - 1:
                lm_loss(out, targets[rows]).backward()
            else:  # = out.backward(upstream), whose grad_tensors path imports sympy (0.3 s per forked rank)
                (out * upstream).sum().backward()
            upstream = x.grad
            grad = torch.zeros(padded[u], dtype=DTYPE)
            grad[:sizes[u]] = torch.cat([p.grad.reshape(-1) for p in unit.parameters()])
            _, grad_shards[u] = reduce_gradients(grad, n, 3, owned_slice(rank, n, padded[u]), comm)
            _free_unit(unit)
        if step == 1:  # ZeRO-3 holds its shards plus whatever the modules still have (nothing once freed)
            ledger = _ledger({"params": [*param_shards, *model.parameters()], "grads": grad_shards,
                              "master": masters, "exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs})
        for master, grad, exp_avg, exp_avg_sq in zip(masters, grad_shards, exp_avgs, exp_avg_sqs):
            adam_update(master, grad, exp_avg, exp_avg_sq, step, cfg.lr)
        param_shards = [m.clone() for m in masters]
        total = loss.clone()
        dist.all_reduce(total)
        losses.append(total.item() / n)
    return {"psi": sum(padded), "ledger": ledger, "shards": param_shards, "sizes": sizes, "losses": losses,
            "comm": comm, "gathered_peak": peak}


@dataclass
class ZeroResult:
    world_size: int
    n_params: dict[int, int]  # stage -> Psi of its flat buffers (each padded to a multiple of N)
    memory: dict[int, list[float]]  # stage -> measured bytes per rank
    ddp_grad_error: float  # DDP's averaged gradient vs the full batch's, step 1
    ddp_vs_single_error: float  # DDP's parameters after training vs textbook Adam in one process
    zero_vs_ddp_error: dict[int, float]  # stage -> max |params - DDP's|
    losses: dict[int, list[float]]
    comm_elements: dict[int, dict[str, int]]  # stage -> collective -> elements per step
    gathered_peak: int  # ZeRO-3: the most full parameter elements a rank held at once (measured)
    largest_unit: int  # parameters of the largest FSDP unit: the embedding, a block, or norm + lm_head

    def traffic(self, stage: int) -> int:
        """Elements a rank communicates per step, an all-reduce counted as reduce-scatter + all-gather
        (2 Psi), as the ZeRO paper counts it."""
        return sum(2 * e if kind == "all_reduce" else e for kind, e in self.comm_elements[stage].items())


def run_zero(cfg: MegatronConfig, world_size: int, weights: dict, tokens, targets,
             stages: tuple[int, ...] = (0, 1, 2, 3)) -> ZeroResult:
    model = build_model(cfg, weights)
    psi = sum(p.numel() for p in model.parameters())
    params = list(model.parameters())
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    ref_grad = None
    for step in range(1, cfg.train_steps + 1):  # the single-process oracle: full batch, textbook Adam
        model.zero_grad()
        lm_loss(model(tokens), targets).backward()
        if step == 1:
            ref_grad = torch.cat([p.grad.reshape(-1) for p in params])
        with torch.no_grad():
            for p, (m, v) in zip(params, moments):
                textbook_adam_step(p, p.grad, m, v, step, cfg.lr)
    ref_final = torch.cat([p.detach().reshape(-1) for p in params])
    # counted from the model, not from the units the ranks used, so that a coarser wrapping cannot pass
    units = [[model.embed_tokens], *[[layer] for layer in model.layers], [model.norm, model.lm_head]]
    largest_unit = max(sum(p.numel() for m in unit for p in m.parameters()) for unit in units)
    ranks = run_world(world_size, _zero_rank, cfg, weights, tokens, targets, stages,
                      timeout_s=cfg.world_timeout_s, collective_timeout_s=cfg.collective_timeout_s)
    out = {stage: [r[stage] for r in ranks] for stage in stages}
    # each unit's shards side by side, its padding cut off, units in order: the model's parameters
    finals = {s: torch.cat([torch.cat([r["shards"][u] for r in ranks])[:size]
                            for u, size in enumerate(ranks[0]["sizes"])]) for s, ranks in out.items()}
    ddp = out[0][0]
    per_step = {}
    for s, ranks in out.items():
        counts: dict[str, int] = {}
        for kind, elements in ranks[0]["comm"]:
            counts[kind] = counts.get(kind, 0) + elements
        per_step[s] = {k: v // cfg.train_steps for k, v in counts.items()}
    return ZeroResult(
        world_size, {s: ranks[0]["psi"] for s, ranks in out.items()},
        {s: [float(sum(r["ledger"].values())) for r in ranks]
         for s, ranks in out.items()},
        (ddp["first_grad"][:psi] - ref_grad).abs().max().item(),
        (finals[0] - ref_final).abs().max().item(),
        {s: (finals[s] - finals[0]).abs().max().item() for s in out if s != 0},
        {s: ranks[0]["losses"] for s, ranks in out.items()}, per_step,
        max((r["gathered_peak"] for r in out.get(3, [])), default=0), largest_unit)


# ---------------------------------------------------------------------------------------------------
# Pipeline parallelism: stages of layers, activations by send / recv, a schedule executed for real


def _stage_forward(model, stage: int, p: int, x: torch.Tensor, targets: torch.Tensor, n_micro: int):
    per_stage = len(model.layers) // p
    if stage == 0:
        x = model.embed_tokens(x)  # x were token ids
    positions = torch.arange(x.shape[1])
    for layer in model.layers[stage * per_stage:(stage + 1) * per_stage]:
        x = layer(x, positions)
    if stage == p - 1:  # the last stage ends in the loss, 1/m per micro-batch
        return lm_loss(model.lm_head(model.norm(x)), targets) / n_micro
    return x


def pop_stash(stash: dict, micro: int):
    """The stashed (input, output) of micro-batch ``micro``, removed: its activations are freed."""
    return stash.pop(micro)


def _pipeline_rank(stage: int, p: int, cfg: MegatronConfig, weights: dict, tokens, targets, ops) -> dict:
    model = build_model(cfg, weights)
    micro_tokens, micro_targets = tokens.chunk(cfg.n_micro), targets.chunk(cfg.n_micro)
    shape = (micro_tokens[0].shape[0], cfg.seq_len, cfg.d_model)
    stash, sends, most, loss = {}, [], 0, 0.0
    for kind, i in ops[stage]:
        if kind == "F":
            if stage == 0:
                x = micro_tokens[i]
            else:
                x = torch.empty(shape, dtype=DTYPE)
                dist.recv(x, src=stage - 1, tag=i)
                x.requires_grad_()
            out = _stage_forward(model, stage, p, x, micro_targets[i], cfg.n_micro)
            if stage < p - 1:
                sends.append(dist.isend(out.detach().contiguous(), dst=stage + 1, tag=i))
            else:
                loss += out.item()
            stash[i] = (x, out)  # activations kept until this micro-batch's backward
            most = max(most, len(stash))
        else:
            x, out = pop_stash(stash, i)
            if stage == p - 1:
                out.backward()
            else:
                grad = torch.empty(shape, dtype=DTYPE)
                dist.recv(grad, src=stage + 1, tag=i)
                # = out.backward(grad), whose grad_tensors path imports sympy (0.3 s per forked rank)
                (out * grad).sum().backward()
            if stage > 0:
                sends.append(dist.isend(x.grad.contiguous(), dst=stage - 1, tag=i))
    for work in sends:
        work.wait()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    return {"grads": grads, "in_flight": most, "loss": loss}


@dataclass
class PipelineResult:
    world_size: int
    schedule: str
    grad_error: float  # max |grad - single process| over every parameter
    loss_error: float
    in_flight: list[int]  # measured per stage
    timeline: list[tuple[int, str, int, float, float]] = field(default_factory=list)
    bubble: float = math.nan  # idle share of the simulated timeline (t_f = t_b = 1)


def run_pipeline(cfg: MegatronConfig, world_size: int, weights: dict, tokens, targets, schedule: Any,
                 name: str) -> PipelineResult:
    timeline = simulate_schedule(schedule, world_size, cfg.n_micro)  # raises before launching a bad one
    ops = [[(str(k), int(i)) for k, i in stage] for stage in schedule]
    model = build_model(cfg, weights)
    ref_loss = lm_loss(model(tokens), targets)
    ref_loss.backward()
    ranks = run_world(world_size, _pipeline_rank, cfg, weights, tokens, targets, ops,
                      timeout_s=cfg.world_timeout_s, collective_timeout_s=cfg.collective_timeout_s)
    got: dict[str, torch.Tensor] = {}
    for r in ranks:
        got.update(r["grads"])
    grad_error = max((got[n] - q.grad).abs().max().item() if n in got else math.inf
                     for n, q in model.named_parameters())
    return PipelineResult(world_size, name, grad_error, abs(ranks[-1]["loss"] - ref_loss.item()),
                          [r["in_flight"] for r in ranks], timeline, timeline_bubble(timeline, world_size))


# ---------------------------------------------------------------------------------------------------
# Everything, per world size


@dataclass
class Result:
    tensor_parallel: dict[int, TensorParallelResult]
    zero: dict[int, ZeroResult]
    gpipe: dict[int, PipelineResult]
    one_f_one_b: dict[int, PipelineResult]


def run(cfg: MegatronConfig, g: torch.Generator) -> Result:
    weights = make_weights(cfg, g)
    tokens, targets = make_batch(cfg, g)
    tp, zero, gpipe, ofob = {}, {}, {}, {}
    for w in cfg.world_sizes:
        tp[w] = run_tensor_parallel(cfg, w, weights, tokens, targets)
        zero[w] = run_zero(cfg, w, weights, tokens, targets)
        gpipe[w] = run_pipeline(cfg, w, weights, tokens, targets, gpipe_schedule(w, cfg.n_micro), "gpipe")
        ofob[w] = run_pipeline(cfg, w, weights, tokens, targets, one_f_one_b_schedule(w, cfg.n_micro), "1f1b")
    return Result(tp, zero, gpipe, ofob)
