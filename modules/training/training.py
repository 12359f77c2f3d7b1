"""Training utilities: AdamW, warmup + cosine, gradient accumulation, global-norm clipping, checkpoints.

    AdamW         m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
                  theta <- theta (1 - lr wd)     (decoupled: the decay never enters m or v)
                  theta <- theta - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    Warmup+cosine lr(s) = max_lr s / W  for s < W,   then  min_lr + (max_lr - min_lr) (1 + cos(pi p)) / 2
                  with p = (s - W) / (S - W) going 0 -> 1;  lr(s >= S) = min_lr
    Clipping      g <- g min(1, c / (||g|| + 1e-6)),  ||g|| = sqrt(sum over ALL parameters of g^2)
    Accumulation  grad = sum over micro-batches of d(sum of token NLLs) / d theta, / (tokens in the batch)
    Perplexity    ppl = exp(sum NLL / number of target tokens) = exp(mean NLL)

Builds on: nothing; used by transformer, sft and every later module that trains a model.
The closed loop run() trains a model it is given (the audit passes the tiny Llama of modules.transformer,
which itself trains with this module) on a random Markov chain whose optimal perplexity is known.
Deviations: AdamW follows torch.optim.AdamW's single-tensor path operation by operation (so it is
bit-identical to it), minus amsgrad/maximize/foreach. The schedule equals transformers'
get_cosine_schedule_with_warmup when min_lr = 0. Checkpoints are plain torch.save dicts.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

__all__ = [
    "FORMULAS", "IGNORE_INDEX", "OptimConfig", "TrainingConfig",
    "adamw_step", "cosine_schedule", "clip_grad_global_norm",
    "AdamW", "WarmupCosine", "weight_decay_groups", "configure_optimizer", "clip_grad_norm_",
    "adamw_vs_torch",
    "token_nll", "lm_nll", "accumulate_gradients", "perplexity", "train", "supervised_warm_up",
    "save_checkpoint", "load_checkpoint",
    "markov_chain", "sample_markov", "entropy_rate", "entropy_given_last_token", "markov_batch", "MarkovResult", "run",
]

IGNORE_INDEX = -100  # label value excluded from the loss (PyTorch's and HF's convention)

FORMULAS = [
    ("AdamW", r"$\theta \leftarrow \theta(1-\eta\lambda) - \eta\,\frac{m_t/(1-\beta_1^t)}"
              r"{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}$"),
    ("Warmup + cosine", r"$\eta(s)=\eta_{min}+\frac{\eta_{max}-\eta_{min}}{2}\left(1+\cos\pi\,"
                        r"\frac{s-W}{S-W}\right),\ s\geq W$"),
    ("Global-norm clipping", r"$g \leftarrow g\,\min\left(1, \frac{c}{\|g\|_2+10^{-6}}\right)$"),
    ("Perplexity", r"$\mathrm{PPL}=\exp\left(-\frac{1}{N}\sum_{t}\log p(x_t|x_{<t})\right)$"),
]


@dataclass(frozen=True)
class OptimConfig:
    """The optimisation recipe of one training run (what train() and configure_optimizer() read)."""

    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 3e-4  # floor of the cosine decay (nanoGPT: peak / 10)
    warmup_steps: int = 20  # linear warmup from 0
    weight_decay: float = 0.1  # decoupled decay on matrices only (not on norms' gains)
    beta1: float = 0.9
    beta2: float = 0.95  # LLM pretraining recipes use 0.95 rather than Adam's 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm threshold; 0 disables clipping
    micro_batches: int = 1  # gradient accumulation: slices per optimizer step


@dataclass(frozen=True)
class TrainingConfig:
    """What the training audit runs: a tiny LM on a random Markov chain whose entropy rate is known."""

    n_states: int = 12  # vocabulary of the Markov chain
    order: int = 1  # the next token depends on the previous `order` tokens (2 needs attention)
    sharpness: float = 2.0  # std of the transition logits (larger = a more predictable chain)
    seq_len: int = 24  # tokens per training sequence
    batch_size: int = 32
    steps: int = 100  # optimizer steps of the closed loop
    lr: float = 1e-2  # peak; cosine to lr / 10
    warmup_steps: int = 10
    weight_decay: float = 0.1  # decoupled, on matrices only
    micro_batches: int = 2  # gradient accumulation in the closed loop
    d_model: int = 32
    n_layers: int = 1
    eval_sequences: int = 256  # held-out sequences for the perplexity measurement
    adam_compare_steps: int = 8  # steps of our AdamW vs torch.optim.AdamW, compared after every step
    resume_steps: int = 5  # steps before and after the checkpoint in the resume check
    max_excess_ppl: float = 0.06  # outcome bar on ppl / exp(H) - 1 (see the README for the sweep behind it)

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "n_states": ">= 2", "order": ">= 1", "sharpness": ">= 0", "seq_len": ">= 2", "batch_size": ">= 1",
        "steps": ">= 1", "lr": ">= 0", "warmup_steps": ">= 0", "weight_decay": ">= 0", "micro_batches": ">= 1",
        "d_model": ">= 1", "n_layers": ">= 1", "eval_sequences": ">= 1", "adam_compare_steps": ">= 1",
        "resume_steps": ">= 1", "max_excess_ppl": ">= 0",
    }

    def __post_init__(self):
        if self.order < 1 or self.seq_len <= self.order or self.steps <= self.warmup_steps:
            raise ValueError("need order >= 1, seq_len > order and steps > warmup_steps")

    @classmethod
    def toy(cls) -> TrainingConfig:
        return cls()

    @classmethod
    def full(cls) -> TrainingConfig:
        return cls(n_states=6, order=2, n_layers=2, steps=450, lr=2e-2, warmup_steps=30, eval_sequences=1024,
                   adam_compare_steps=20, resume_steps=10, max_excess_ppl=0.05)


# ---------------------------------------------------------------------------------------------------
# Kernels: the AdamW update, the schedule, the clipping


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: int, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW update of one parameter tensor (Loshchilov & Hutter), returned out of place.

    step is the 1-based count of updates including this one (t); all tensors have the same shape.
        theta = theta * (1 - lr * weight_decay)          # decoupled weight decay, not added to grad
        m     = beta1 * m + (1 - beta1) * grad           # first moment  (exp_avg)
        v     = beta2 * v + (1 - beta2) * grad**2        # second moment (exp_avg_sq)
        theta = theta - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    Returns (new_param, new_exp_avg, new_exp_avg_sq). eps is added after the square root.
    """
    param = param * (1 - lr * weight_decay)
    exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)  # = beta1 m + (1 - beta1) g, as torch computes it
    exp_avg_sq = torch.addcmul(exp_avg_sq * beta2, grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = exp_avg_sq.sqrt() / bias_correction2 ** 0.5 + eps
    param = torch.addcdiv(param, exp_avg, denom, value=-lr / bias_correction1)
    return param, exp_avg, exp_avg_sq


def cosine_schedule(step: int, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine decay to min_lr.

        step < W:        lr = max_lr * step / W                       (lr(0) = 0, lr(W) = max_lr)
        W <= step <= S:  p = (step - W) / (S - W)
                         lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2
        step >= S:       lr = min_lr
    W = warmup_steps, S = total_steps (W < S). Returns a Python float. Increasing during warmup,
    non-increasing after it.
    """
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_grad_global_norm(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Scale all gradients by one common factor so that their joint L2 norm is at most max_norm.

        total_norm = sqrt(sum_i ||g_i||^2)                       (one norm over ALL tensors)
        g_i       <- g_i * min(1, max_norm / (total_norm + 1e-6))   (never scales up)
    grads: list of tensors of any shapes. Returns (clipped grads: new tensors, same shapes,
    total_norm: 0-dim tensor measured before clipping), as torch.nn.utils.clip_grad_norm_ does.
    """
    norms = torch.stack([g.detach().norm(2) for g in grads])
    total_norm = norms.norm(2)
    scale = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    return [g * scale for g in grads], total_norm


# ---------------------------------------------------------------------------------------------------
# The optimizer and scheduler objects built on the kernels


class AdamW:
    """AdamW over param groups whose update is ``step_fn`` (the ``adamw_step`` kernel by default).

    The same interface as torch.optim.AdamW where it matters here (param_groups, step, zero_grad,
    state_dict, load_state_dict), written without torch.optim.Optimizer: its first use imports
    torch._dynamo, about a second of start-up that a tiny model's whole training run does not have.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, step_fn: Callable = adamw_step):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[torch.Tensor, dict] = {}  # per parameter: step, exp_avg (m), exp_avg_sq (v)
        self.step_fn = step_fn

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, {"step": 0, "exp_avg": torch.zeros_like(p),
                                                  "exp_avg_sq": torch.zeros_like(p)})
                state["step"] += 1
                new_p, state["exp_avg"], state["exp_avg_sq"] = self.step_fn(
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                    beta1, beta2, group["eps"], group["weight_decay"])
                p.copy_(new_p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """torch.optim's layout: parameters are referred to by their index over all groups."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for group in self.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        state = {index[id(p)]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        params = self._params()
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {params[i]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state_dict["state"].items()}


class WarmupCosine:
    """Sets every param group's lr to cosine_schedule(step) before each optimizer step."""

    def __init__(self, optimizer: AdamW, total_steps: int, warmup_steps: int,
                 max_lr: float, min_lr: float, *, schedule: Callable = cosine_schedule):
        self.optimizer, self.schedule = optimizer, schedule
        self.total_steps, self.warmup_steps, self.max_lr, self.min_lr = total_steps, warmup_steps, max_lr, min_lr
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.schedule(step, self.total_steps, self.warmup_steps, self.max_lr, self.min_lr)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.last_step)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state["last_step"]
        self._apply()


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW param groups as nanoGPT makes them: weight decay on matrices (dim >= 2: linear layers,
    embeddings) only; vectors -- norm gains and biases -- get none, since shrinking a gain towards 0
    or a bias towards 0 is not a useful prior. Empty groups are left out; the decayed group comes first."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def configure_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int, *,
                        step_fn: Callable = adamw_step,
                        schedule: Callable = cosine_schedule) -> tuple[AdamW, WarmupCosine]:
    """AdamW with weight decay on matrices only (weight_decay_groups), and its warmup + cosine
    schedule over ``total_steps``."""
    optimizer = AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                      eps=cfg.eps, step_fn=step_fn)
    return optimizer, WarmupCosine(optimizer, total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr,
                                   schedule=schedule)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, *,
                    clip_fn: Callable = clip_grad_global_norm) -> float:
    """Clip the .grad of ``parameters`` in place with ``clip_fn``; returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    clipped, total_norm = clip_fn([p.grad for p in params], max_norm)
    with torch.no_grad():
        for p, g in zip(params, clipped):
            p.grad.copy_(g)
    return float(total_norm)


def adamw_vs_torch(model: torch.nn.Module, next_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
                   steps: int, generator: torch.Generator, *, lr: float = 1e-2,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1, step_fn: Callable = adamw_step) -> list[float]:
    """Our AdamW (with ``step_fn``) and torch.optim.AdamW from the same weights and the same gradients:
    max |theta_ours - theta_torch| over all parameters after each of ``steps`` steps.

    The gradient of each step is computed once, on our copy, and given to both optimizers, so the two
    runs differ only by the optimizer's arithmetic: a rounding difference stays a rounding difference
    instead of being amplified by two diverging loss landscapes. ``model`` itself is not modified.
    """
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    opt_ours = AdamW(weight_decay_groups(ours, weight_decay), lr=lr, betas=betas, eps=eps, step_fn=step_fn)
    opt_torch = torch.optim.AdamW(weight_decay_groups(theirs, weight_decay), lr=lr, betas=betas, eps=eps,
                                  foreach=False)
    diffs = []
    for _ in range(steps):
        nll, n = lm_nll(ours, *next_batch(generator))
        (nll / n).backward()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            q.grad = p.grad.clone()
        opt_ours.step()
        opt_torch.step()
        opt_ours.zero_grad()
        opt_torch.zero_grad()
        with torch.no_grad():
            gaps = torch.stack([(p - q).abs().max().double() for p, q in zip(ours.parameters(), theirs.parameters())])
            diffs.append(gaps.max().item())  # torch's max keeps a NaN (Python's max may drop it)
    return diffs


# ---------------------------------------------------------------------------------------------------
# Losses, gradient accumulation, perplexity


def token_nll(logits: torch.Tensor, targets: torch.Tensor,
              ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(target) over non-ignored positions, number of those positions).

    logits (..., V), targets (...) int with ``ignore_index`` where no loss is taken. Sums, not means,
    so that callers can weight micro-batches by tokens.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the log-softmax of a low-precision tensor loses too much
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=ignore_index, reduction="sum")
    return nll, (targets != ignore_index).sum()


def lm_nll(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default loss of train(): token_nll of ``model(inputs)`` (logits) against ``targets``."""
    return token_nll(model(inputs), targets)


def accumulate_gradients(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         micro_batches: int, loss_fn: Callable = lm_nll) -> float:
    """Backward over ``micro_batches`` slices of one batch; returns the batch's mean NLL per token.

    Each slice's SUMMED loss is divided by the token count of the WHOLE batch before backward, so the
    accumulated .grad equals the gradient of the big-batch token-mean loss. (Dividing each slice's
    mean by the number of slices is only right when every slice holds the same number of tokens.)
    """
    n_tokens = (targets != IGNORE_INDEX).sum().clamp_min(1)
    total = 0.0
    for x, y in zip(inputs.chunk(micro_batches), targets.chunk(micro_batches)):
        nll_sum, _ = loss_fn(model, x, y)
        (nll_sum / n_tokens).backward()
        total += nll_sum.item()
    return total / n_tokens.item()


def perplexity(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """exp(mean NLL per target token), pooled over all tokens of all sequences (not a mean of
    per-sequence perplexities). A uniform model over V tokens has perplexity exactly V."""
    nll, n = token_nll(logits, targets, ignore_index)
    return math.exp(nll.item() / max(1, n.item()))


# ---------------------------------------------------------------------------------------------------
# The loop and its checkpoints


def train(model: torch.nn.Module, next_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
          optimizer: AdamW, scheduler: WarmupCosine, steps: int, *,
          generator: torch.Generator, grad_clip: float = 1.0, micro_batches: int = 1,
          clip_fn: Callable = clip_grad_global_norm, loss_fn: Callable = lm_nll,
          on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run ``steps`` optimizer steps; returns one dict per step: loss (mean NLL), lr, grad_norm.

    ``next_batch(generator)`` draws (inputs, targets); all randomness must come from ``generator``
    so that a checkpoint (which saves it) resumes bit-identically.
    """
    model.train()
    history = []
    for _ in range(steps):
        inputs, targets = next_batch(generator)
        loss = accumulate_gradients(model, inputs, targets, micro_batches, loss_fn)
        if grad_clip > 0:
            grad_norm = clip_grad_norm_(model.parameters(), grad_clip, clip_fn=clip_fn)
        else:
            grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
        record = {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        history.append(record)
        if on_step is not None:
            on_step(len(history) - 1, record)
    return history


def supervised_warm_up(model: torch.nn.Module, next_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
                       steps: int, lr: float, generator: torch.Generator, warmup_steps: int | None = None) -> list[dict]:
    """A short supervised run (AdamW, linear warmup then cosine to lr / 10, clipping at 1): the SFT
    stand-in with which the alignment modules make their starting policy. warmup_steps defaults to
    min(10, steps // 2). Returns train()'s history; an empty one when steps is 0."""
    if steps == 0:
        return []
    optim = OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=min(10, steps // 2) if warmup_steps is None else warmup_steps)
    optimizer, scheduler = configure_optimizer(model, optim, steps)
    return train(model, next_batch, optimizer, scheduler, steps, generator=generator, grad_clip=optim.grad_clip)


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: AdamW,
                    scheduler: WarmupCosine, generator: torch.Generator, step: int) -> None:
    """Everything a bit-identical resume needs: weights, optimizer moments and step counts, the
    scheduler position, the data generator and the global RNGs (torch, python)."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "step": step}, path)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: AdamW,
                    scheduler: WarmupCosine, generator: torch.Generator) -> int:
    """Restore what save_checkpoint wrote into freshly built objects; returns the saved step."""
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"]


# ---------------------------------------------------------------------------------------------------
# A toy corpus with a known optimum: a random Markov chain of order k


def markov_chain(n_states: int, order: int, sharpness: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random order-k chain over V = n_states tokens: P (V^k, V), where row c is the next-token
    distribution after the context c = x_{t-k+1} ... x_t read as a base-V number, drawn as
    softmax(sharpness * N(0, 1)); and pi (V^k,), the stationary distribution over contexts."""
    C = n_states ** order
    P = (torch.randn(C, n_states, generator=generator, dtype=torch.float64) * sharpness).softmax(-1)
    # context c followed by token j moves to context (c * V + j) mod V^k
    moves = torch.zeros(C, C, dtype=torch.float64)
    nxt = (torch.arange(C)[:, None] * n_states + torch.arange(n_states)) % C  # (C, V)
    moves.scatter_add_(1, nxt, P)
    evals, evecs = torch.linalg.eig(moves.T)
    pi = evecs[:, evals.real.argmax()].real
    return P, pi / pi.sum()


def sample_markov(P: torch.Tensor, pi: torch.Tensor, n_sequences: int, length: int,
                  generator: torch.Generator) -> torch.Tensor:
    """(n_sequences, length) token sequences: the first k tokens are a context drawn from pi, then
    x_{t+1} ~ P[context of x_{t-k+1..t}]."""
    C, V = P.shape
    order = round(math.log(C, V))
    context = torch.multinomial(pi.float(), n_sequences, replacement=True, generator=generator)
    first = [(context // V ** (order - 1 - i)) % V for i in range(order)]  # base-V digits, oldest first
    x = torch.empty(n_sequences, length, dtype=torch.long)
    x[:, :order] = torch.stack(first, dim=1)
    for t in range(order, length):
        x[:, t] = torch.multinomial(P[context].float(), 1, generator=generator).squeeze(-1)
        context = (context * V + x[:, t]) % C
    return x


def entropy_rate(P: torch.Tensor, pi: torch.Tensor) -> float:
    """H = -sum_c pi_c sum_j P_cj log P_cj (nats per token): the lowest achievable mean NLL of a
    token given its full context, so the best possible perplexity on the chain is exp(H)."""
    return float(-(pi[:, None] * P * P.clamp_min(1e-300).log()).sum())


def entropy_given_last_token(P: torch.Tensor, pi: torch.Tensor) -> float:
    """H(x_t | x_{t-1}) in nats: the best mean NLL of a model that sees only the previous token. Equal
    to the entropy rate for a first-order chain, larger for higher orders (then attention is needed)."""
    C, V = P.shape
    joint = torch.zeros(V, V, dtype=P.dtype).index_add_(0, torch.arange(C) % V, pi[:, None] * P)  # p(last, next)
    cond = joint / joint.sum(-1, keepdim=True).clamp_min(1e-300)
    return float(-(joint * cond.clamp_min(1e-300).log()).sum())


def markov_batch(cfg: TrainingConfig, P: torch.Tensor, pi: torch.Tensor, n: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (n, seq_len): next-token pairs of n sequences of the chain; the first
    order - 1 targets lack their full context and are IGNORE_INDEX."""
    seq = sample_markov(P, pi, n, cfg.seq_len + 1, generator)
    targets = seq[:, 1:].clone()
    targets[:, : cfg.order - 1] = IGNORE_INDEX
    return seq[:, :-1], targets


# ---------------------------------------------------------------------------------------------------
# The closed loop


@dataclass
class MarkovResult:
    """What run() returns: the training curve and the held-out perplexity against the chain's optimum."""

    history: list[dict]  # per optimizer step: loss, lr, grad_norm
    perplexity: float  # held-out, on cfg.eval_sequences fresh sequences
    optimal_perplexity: float  # exp(entropy rate): what the true chain itself scores
    uniform_perplexity: float  # V: what a uniform guess scores
    last_token_perplexity: float  # exp H(x_t | x_{t-1}): the best a model seeing one token back can do

    @property
    def excess(self) -> float:
        """perplexity / optimum - 1: 0 for a model that has learned the chain exactly."""
        return self.perplexity / self.optimal_perplexity - 1


def run(cfg: TrainingConfig, generator: torch.Generator, *, model: torch.nn.Module,
        adamw_step: Callable = adamw_step, cosine_schedule: Callable = cosine_schedule,
        clip_grad_global_norm: Callable = clip_grad_global_norm,
        on_step: Callable[[int, dict], None] | None = None) -> MarkovResult:
    """The experiment: draw a random order-k chain from ``generator``, train ``model`` (token ids (B, T)
    -> logits (B, T, n_states), e.g. modules.transformer's Transformer) on it with AdamW, warmup-cosine,
    clipping and gradient accumulation built on the three kernels, then measure its perplexity on
    fresh sequences against exp(entropy rate)."""
    P, pi = markov_chain(cfg.n_states, cfg.order, cfg.sharpness, generator)
    optim = OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=cfg.warmup_steps,
                        weight_decay=cfg.weight_decay, micro_batches=cfg.micro_batches)
    optimizer, scheduler = configure_optimizer(model, optim, cfg.steps, step_fn=adamw_step, schedule=cosine_schedule)
    history = train(model, lambda g: markov_batch(cfg, P, pi, cfg.batch_size, g), optimizer, scheduler, cfg.steps,
                    generator=generator, grad_clip=optim.grad_clip, micro_batches=optim.micro_batches,
                    clip_fn=clip_grad_global_norm, on_step=on_step)
    x, y = markov_batch(cfg, P, pi, cfg.eval_sequences, generator)
    model.eval()
    with torch.no_grad():
        ppl = perplexity(model(x), y)
    return MarkovResult(history, ppl, math.exp(entropy_rate(P, pi)), float(cfg.n_states),
                        math.exp(entropy_given_last_token(P, pi)))
