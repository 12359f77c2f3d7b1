"""LoRA: a frozen weight plus a trainable low-rank update, h = W0 x + s B A x.

    forward    h = W0 x + s * B (A x)           A (r, d_in), B (d_out, r), s = alpha / r
    rsLoRA     s = alpha / sqrt(r)              (Kalajdzievski 2023; PEFT's use_rslora=True)
    init       A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)),  B = 0   (PEFT's default)
               so B A = 0 and the adapted model starts exactly at the base model
    merge      W = W0 + s B A    (inference with no extra matmul);   unmerge  W0 = W - s B A
    count      r (d_in + d_out) trainable numbers per adapted matrix, instead of d_in d_out

The experiment: a tiny Llama is trained (modules.training.supervised_warm_up, the SFT stand-in) to
COPY a digit string; the new task, SWAP, copies it with 0<->1, 2<->3, 4<->5 exchanged (a rank-3 change
of the token map, carried by the attention's value path). Full fine-tuning, LoRA on v_proj and o_proj
and a rank sweep start from the same base; exact match is measured on fresh strings.

Builds on: transformer (the tiny Llama), training (AdamW, warmup + cosine, train()).
Deviations from PEFT: no dropout on the LoRA branch (PEFT's default is 0 too), no fan_in_fan_out,
no DoRA; an adapter wraps an nn.Linear of the model in place (LoRALinear), as PEFT's module surgery does.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.training import IGNORE_INDEX, OptimConfig, configure_optimizer, supervised_warm_up, train
from modules.transformer import ModelConfig, Transformer

__all__ = [
    "FORMULAS", "LoRAConfig",
    "lora_forward", "merge_lora", "lora_scaling", "lora_param_count",
    "LoRALinear", "freeze_base", "add_lora", "adapters", "merge_all", "unmerge_all",
    "trainable_parameters", "task_batch", "model_config", "train_base", "exact_match",
    "finetune", "FinetuneRun", "scaling_effect", "LoRAResult", "run",
]

FORMULAS = [
    ("LoRA forward", r"$h=W_0x+s\,B(Ax),\quad s=\alpha/r\ (\mathrm{rsLoRA}:\ \alpha/\sqrt{r})$"),
    ("Init", r"$A\sim\mathcal{U}(-1/\sqrt{d_{in}},1/\sqrt{d_{in}}),\ B=0\ \Rightarrow\ BA=0$"),
    ("Merge", r"$W=W_0+s\,BA$"),
    ("Trainable parameters", r"$N=\sum r\,(d_{in}+d_{out})\quad\mathrm{vs}\quad d_{in}d_{out}$"),
]


TASKS = ("copy", "swap", "rotate", "reverse")


@dataclass(frozen=True)
class LoRAConfig:
    """What the lora audit runs: the base model and its task, the adapters, the fine-tuning runs."""

    d_model: int = 64
    n_layers: int = 1
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 172
    rope_theta: float = 100.0
    n_symbols: int = 10  # digits; <bos> and <sep> are the next two ids
    n_items: int = 4  # length of the digit string
    base_task: str = "copy"  # what the base model is trained on (one of TASKS)
    new_task: str = "swap"  # what fine-tuning teaches
    n_swaps: int = 3  # the swap task exchanges 0<->1, 2<->3, ...: a change of rank n_swaps in the token map
    base_steps: int = 50
    base_lr: float = 2e-2
    batch_size: int = 32
    finetune_steps: int = 50
    full_lr: float = 1e-2  # full fine-tuning: every parameter
    lora_lr: float = 5e-2  # LoRA: A and B only (adapters take a larger lr than full fine-tuning)
    rank: int = 4
    alpha: float = 8.0
    use_rslora: bool = False
    targets: str = "v_proj,o_proj"  # the projections that get an adapter: the swap is a change of the value path
    eval_size: int = 512  # fresh strings for exact match
    sweep_ranks: str = ""  # comma-separated ranks of the rank sweep ("" skips it)
    scaling_ranks: str = "2,32"  # small and large rank of the alpha/r vs alpha/sqrt(r) comparison
    scaling_steps: int = 4  # fine-tuning steps of each run in that comparison
    # bars from the seed sweep (docs/sweep): see the README's table
    max_base_accuracy: float = 0.1  # base model on the new task, before fine-tuning (chance of no swapped digit: 0.4^n)
    min_full_accuracy: float = 0.9
    max_gap_to_full: float = 0.05  # full fine-tuning's exact match minus LoRA's
    max_trainable_fraction: float = 0.02
    min_rslora_gain: float = 2.0  # (large/small-rank update size under rsLoRA) / (the same under alpha/r)

    RANGES = {
        "d_model": ">= 1", "n_layers": ">= 1", "n_heads": ">= 1", "n_kv_heads": ">= 1", "d_ff": ">= 1",
        "rope_theta": "> 1", "n_symbols": ">= 2", "n_items": ">= 2", "n_swaps": ">= 0", "base_steps": ">= 0", "base_lr": ">= 0",
        "batch_size": ">= 1", "finetune_steps": ">= 1", "full_lr": ">= 0", "lora_lr": ">= 0", "rank": ">= 1",
        "alpha": "> 0", "eval_size": ">= 1", "scaling_steps": ">= 1", "max_base_accuracy": "[0, 1]",
        "min_full_accuracy": "[0, 1]", "max_gap_to_full": "[0, 1]", "max_trainable_fraction": "(0, 1]",
        "min_rslora_gain": "> 0",
    }

    def __post_init__(self):
        for task in (self.base_task, self.new_task):
            if task not in TASKS:
                raise ValueError(f"tasks are {TASKS}, got {task!r}")
        if 2 * self.n_swaps > self.n_symbols:
            raise ValueError(f"n_swaps={self.n_swaps} pairs need {2 * self.n_swaps} of the {self.n_symbols} symbols")

    @classmethod
    def toy(cls) -> LoRAConfig:
        return cls()

    @classmethod
    def full(cls) -> LoRAConfig:
        return cls(n_items=5, base_steps=100, finetune_steps=60, eval_size=2048, sweep_ranks="1,2,4,8,32")


# ---------------------------------------------------------------------------------------------------
# Kernels


def lora_forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """A linear layer with a LoRA adapter: h = x W0^T + scaling * (x A^T) B^T.

    x: (..., d_in); weight W0: (d_out, d_in), frozen; lora_A: (r, d_in); lora_B: (d_out, r);
    scaling s = alpha / r (alpha / sqrt(r) for rsLoRA). Returns (..., d_out). Compute x A^T first
    (r numbers per token), never the (d_out, d_in) product B A: that is what makes the adapter cheap.
    Gradients reach A and B (and x); W0 receives none if it does not require grad.
    """
    return F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * scaling


def merge_lora(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The merged weight W = W0 + scaling * B A, (d_out, d_in), a new tensor (W0 is not modified).

    x W^T then equals lora_forward(x, W0, A, B, scaling) up to rounding, so a merged model serves with
    no extra cost; merge_lora(W, A, B, -scaling) undoes it (unmerge)."""
    return weight + (lora_B @ lora_A) * scaling


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_param_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable numbers of one adapter: A has r d_in, B has d_out r."""
    return r * (d_in + d_out)


# ---------------------------------------------------------------------------------------------------
# Adapters on a model: module surgery on its nn.Linear layers


class LoRALinear(nn.Module):
    """Wraps a linear layer ``base`` (anything with a (d_out, d_in) ``weight``; frozen) and adds A, B."""

    def __init__(self, base: nn.Module, r: int, alpha: float, *, use_rslora: bool = False,
                 generator: torch.Generator | None = None, forward_fn: Callable = lora_forward):
        super().__init__()
        d_out, d_in = base.weight.shape
        self.base, self.r, self.scaling, self.forward_fn = base, r, lora_scaling(alpha, r, use_rslora), forward_fn
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain sqrt(3 / d_in)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the update already lives in base.weight
            return F.linear(x, self.base.weight)
        return self.forward_fn(x, self.base.weight, self.lora_A, self.lora_B, self.scaling)

    def merge(self, merge_fn: Callable = merge_lora) -> None:
        with torch.no_grad():
            self.base.weight.copy_(merge_fn(self.base.weight, self.lora_A, self.lora_B, self.scaling))
        self.merged = True

    def unmerge(self, merge_fn: Callable = merge_lora) -> None:
        with torch.no_grad():
            self.base.weight.copy_(merge_fn(self.base.weight, self.lora_A, self.lora_B, -self.scaling))
        self.merged = False


def freeze_base(model: nn.Module) -> None:
    """requires_grad = False for every parameter (before adapters are added): no gradient, no optimizer state."""
    for p in model.parameters():
        p.requires_grad_(False)


def add_lora(model: Transformer, r: int, alpha: float, targets: str | tuple = ("q_proj", "v_proj"), *,
             use_rslora: bool = False, generator: torch.Generator | None = None,
             forward_fn: Callable = lora_forward) -> list[LoRALinear]:
    """Freeze ``model`` and replace each targeted nn.Linear of its blocks (by attribute name: q_proj,
    k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) by a LoRALinear around it. In place."""
    names = tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else tuple(targets)
    freeze_base(model)
    added = []
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in names:
                base = getattr(parent, name, None)
                if base is not None and not isinstance(base, LoRALinear):
                    adapter = LoRALinear(base, r, alpha, use_rslora=use_rslora, generator=generator,
                                         forward_fn=forward_fn)
                    setattr(parent, name, adapter)
                    added.append(adapter)
    return added


def adapters(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_all(model: nn.Module, merge_fn: Callable = merge_lora) -> None:
    for m in adapters(model):
        m.merge(merge_fn)


def unmerge_all(model: nn.Module, merge_fn: Callable = merge_lora) -> None:
    for m in adapters(model):
        m.unmerge(merge_fn)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------
# The task: copy (the base) and reverse (the new task) a digit string


def task_batch(cfg: LoRAConfig, task: str, batch_size: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), (B, 2n + 1): <bos> x <sep> y with y = x (copy) or x reversed; the loss is
    taken on the n answer tokens only (targets IGNORE_INDEX elsewhere)."""
    bos, sep, n = cfg.n_symbols, cfg.n_symbols + 1, cfg.n_items
    x = torch.randint(0, cfg.n_symbols, (batch_size, n), generator=generator)
    if task == "swap":  # copy, with the digits 2k and 2k + 1 exchanged for k < n_swaps
        y = torch.where(x < 2 * cfg.n_swaps, x ^ 1, x)
    else:
        y = {"copy": x, "reverse": x.flip(1), "rotate": x.roll(-1, dims=1)}[task]
    seq = torch.cat([torch.full((batch_size, 1), bos), x, torch.full((batch_size, 1), sep), y], dim=1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()  # (B, 2n + 1): targets are x, <sep>, y
    targets[:, : n + 1] = IGNORE_INDEX
    return inputs, targets


def model_config(cfg: LoRAConfig) -> ModelConfig:
    return ModelConfig(vocab_size=cfg.n_symbols + 2, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, rope_theta=cfg.rope_theta, max_seq_len=2 * cfg.n_items + 2)


def train_base(cfg: LoRAConfig, generator: torch.Generator) -> Transformer:
    """The base model: weights from ``generator``, then supervised training on the base task."""
    model = Transformer(model_config(cfg), generator=generator)
    supervised_warm_up(model, lambda g: task_batch(cfg, cfg.base_task, cfg.batch_size, g), cfg.base_steps,
                       cfg.base_lr, generator)
    return model


@torch.no_grad()
def exact_match(model: nn.Module, cfg: LoRAConfig, task: str, inputs_targets: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Fraction of strings whose every answer token is the argmax given the right prefix: equal to the
    exact match of greedy decoding (greedy is right iff each of its steps is)."""
    inputs, targets = inputs_targets
    pred = model(inputs).argmax(-1)
    answer = targets != IGNORE_INDEX
    return ((pred == targets) | ~answer).all(dim=1).float().mean().item()


@dataclass
class FinetuneRun:
    model: nn.Module
    history: list[dict]  # train() records: loss, lr, grad_norm
    accuracy: float  # exact match on the new task's fresh strings
    trainable: int  # parameters that received updates


def finetune(base: Transformer, cfg: LoRAConfig, generator: torch.Generator, eval_batch, *, rank: int | None = None,
             use_rslora: bool | None = None, steps: int | None = None, forward_fn: Callable = lora_forward,
             adapt: Callable | None = None) -> FinetuneRun:
    """Fine-tune a copy of ``base`` on the new task. rank None: full fine-tuning at full_lr; else LoRA of
    that rank on cfg.targets at lora_lr (``adapt(model)`` may first change the base, e.g. quantize it)."""
    model = copy.deepcopy(base)
    steps = cfg.finetune_steps if steps is None else steps
    if rank is not None:
        if adapt is not None:
            adapt(model)
        add_lora(model, rank, cfg.alpha, cfg.targets, generator=generator, forward_fn=forward_fn,
                 use_rslora=cfg.use_rslora if use_rslora is None else use_rslora)
    lr = cfg.full_lr if rank is None else cfg.lora_lr
    optim = OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=min(10, steps // 4), weight_decay=0.0)
    optimizer, scheduler = configure_optimizer(model, optim, steps)
    history = train(model, lambda g: task_batch(cfg, cfg.new_task, cfg.batch_size, g), optimizer, scheduler, steps,
                    generator=generator, grad_clip=optim.grad_clip)
    model.eval()
    return FinetuneRun(model, history, exact_match(model, cfg, cfg.new_task, eval_batch), trainable_parameters(model))


def scaling_effect(base: Transformer, cfg: LoRAConfig, generator: torch.Generator, eval_batch,
                   forward_fn: Callable = lora_forward) -> dict[str, dict[int, float]]:
    """At fixed alpha, lr and steps: the size of the learned update, sqrt(sum ||s B A||_F^2) over the
    adapters, for the small and the large rank of cfg.scaling_ranks, under alpha/r and alpha/sqrt(r)."""
    out: dict[str, dict[int, float]] = {"alpha/r": {}, "alpha/sqrt(r)": {}}
    for key, rs in (("alpha/r", False), ("alpha/sqrt(r)", True)):
        for r in (int(v) for v in cfg.scaling_ranks.split(",")):
            run_ = finetune(base, cfg, torch.Generator().manual_seed(int(generator.initial_seed()) + r), eval_batch,
                            rank=r, use_rslora=rs, steps=cfg.scaling_steps, forward_fn=forward_fn)
            with torch.no_grad():
                out[key][r] = math.sqrt(sum(float(((m.lora_B @ m.lora_A) * m.scaling).pow(2).sum())
                                            for m in adapters(run_.model)))
    return out


# ---------------------------------------------------------------------------------------------------
# The experiment


@dataclass
class LoRAResult:
    base: Transformer
    eval_batch: tuple[torch.Tensor, torch.Tensor]  # fresh strings of the new task
    base_accuracy: float  # base model on the new task (before any fine-tuning)
    base_task_accuracy: float  # base model on its own task
    full: FinetuneRun
    lora: FinetuneRun
    total_parameters: int
    rank_sweep: dict[int, FinetuneRun]  # rank -> LoRA run (empty unless cfg.sweep_ranks)


def run(cfg: LoRAConfig, generator: torch.Generator, *, lora_forward: Callable = lora_forward,
        on_progress: Callable[[float], None] | None = None) -> LoRAResult:
    """Base model on the base task; then, from it, full fine-tuning, LoRA (cfg.rank) and the rank sweep
    on the new task, each with the same data stream (a generator cloned from one state)."""
    progress = on_progress or (lambda fraction: None)
    base = train_base(cfg, generator)
    base.eval()
    eval_batch = task_batch(cfg, cfg.new_task, cfg.eval_size, generator)
    base_task_acc = exact_match(base, cfg, cfg.base_task, task_batch(cfg, cfg.base_task, cfg.eval_size, generator))
    progress(0.4)
    state = generator.get_state()

    def stream() -> torch.Generator:
        return torch.Generator().set_state(state)

    full = finetune(base, cfg, stream(), eval_batch)
    progress(0.6)
    lora = finetune(base, cfg, stream(), eval_batch, rank=cfg.rank, forward_fn=lora_forward)
    progress(0.8)
    sweep = {r: lora if r == cfg.rank else finetune(base, cfg, stream(), eval_batch, rank=r, forward_fn=lora_forward)
             for r in (int(v) for v in cfg.sweep_ranks.split(",") if v.strip())}
    return LoRAResult(base, eval_batch, exact_match(base, cfg, cfg.new_task, eval_batch), base_task_acc, full, lora,
                      sum(p.numel() for p in base.parameters()), sweep)
