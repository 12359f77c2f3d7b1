"""Audit of the training utilities (day 5): AdamW against torch, the schedule's shape, the loop's order,
parameter groups, accumulation, clipping, perplexity, bit-identical resume, and a closed loop that
learns a Markov chain down to its entropy rate."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from llmaudit.audit import Audit, kernel, max_error, measure, worst
from modules import training as M
from modules.transformer import ModelConfig, Transformer

F64 = torch.float64


def _example_adamw() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"param": torch.randn(4, 3, generator=g), "grad": torch.randn(4, 3, generator=g),
            "exp_avg": torch.randn(4, 3, generator=g) * 0.1, "exp_avg_sq": torch.rand(4, 3, generator=g) * 0.01,
            "step": 3, "lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def _example_clip() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"grads": [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)], "max_norm": 1.0}


KERNELS = [
    kernel(M.adamw_step, example=_example_adamw,
           hint="decay the weights directly (theta *= 1 - lr*wd) instead of adding wd*theta to the gradient; "
                "bias-correct m and v with 1 - beta^t; eps goes outside the square root."),
    kernel(M.cosine_schedule, example=lambda: {"step": 30, "total_steps": 100, "warmup_steps": 10,
                                              "max_lr": 1e-3, "min_lr": 1e-4},
           hint="progress = (step - warmup) / (total - warmup); lr = min + (max - min) * (1 + cos(pi * "
                "progress)) / 2; hold min_lr after the end."),
    kernel(M.clip_grad_global_norm, example=_example_clip,
           hint="one norm over all tensors together, scale = min(1, max_norm / (norm + 1e-6)) applied to "
                "every tensor; clipping each tensor separately changes the update direction."),
]

training = Audit("training", day=5, title="Training utilities: AdamW, warmup-cosine, accumulation, clipping, resume",
                 config=M.TrainingConfig, kernels=KERNELS, formulas=M.FORMULAS)

S, W, HI, LO = 200, 20, 3e-3, 3e-4  # the schedule the schedule checks draw: 200 steps, 20 of warmup


def _model_config(cfg: M.TrainingConfig) -> ModelConfig:
    """The tiny Llama of modules.transformer, sized for the chain."""
    return ModelConfig(vocab_size=cfg.n_states, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=4,
                       n_kv_heads=2, d_ff=(8 * cfg.d_model // 3 + 7) // 8 * 8, max_seq_len=cfg.seq_len)


def _batches(cfg: M.TrainingConfig, g: torch.Generator):
    """next_batch(generator) over a random chain drawn from g."""
    P, pi = M.markov_chain(cfg.n_states, cfg.order, cfg.sharpness, g)
    return lambda gen: M.markov_batch(cfg, P, pi, cfg.batch_size, gen)


def _grads(g: torch.Generator, scale: float) -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=g, dtype=F64) * scale for shape in ((8, 5), (5,), (3, 4, 2))]


def _global_norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in grads))


# ---- AdamW -----------------------------------------------------------------------------------------

@training.check("< 1e-10", hint="L2 (adding wd * theta to the gradient) is Adam, not AdamW; check the bias "
                                "corrections and that eps is added after the square root.")
def adamw_matches_torch_adamw(adamw_step, cfg, g):
    """AdamW = Adam on the loss gradient plus weight decay applied directly to the weights (decoupled),
    with bias-corrected moments: after every step, from the same weights and gradients, our update
    equals torch.optim.AdamW's (float64, weight decay on matrices)."""
    model = Transformer(_model_config(cfg), generator=g).double()
    diffs = M.adamw_vs_torch(model, _batches(cfg, g), cfg.adam_compare_steps, g, step_fn=adamw_step)
    return measure(diffs, f"max |θ_ours − θ_torch| over {cfg.adam_compare_steps} steps")


@training.check("< 1e-12", hint="bias-correct both moments: m / (1 - beta1^t) and v / (1 - beta2^t), t counted from 1.")
def first_step_moves_every_weight_by_lr(adamw_step, g):
    """At t = 1 the bias-corrected moments are g and g^2, so (with eps = 0 and no decay) every weight
    moves by exactly lr against its gradient's sign, whatever the gradient's size."""
    param = torch.randn(64, generator=g, dtype=F64)
    grad = torch.randn(64, generator=g, dtype=F64) * torch.logspace(-3, 2, 64, dtype=F64)
    new, _, _ = adamw_step(param, grad, torch.zeros_like(param), torch.zeros_like(param), 1, 0.01, 0.9, 0.95, 0.0, 0.0)
    return max_error((new - param) / 0.01, -grad.sign())


@training.check({"vector_change": "== 0", "matrix_decay_error": "< 1e-12"},
                hint="put parameters with dim < 2 (norm gains, biases) in a group with weight_decay 0.")
def weight_decay_skips_gains_and_biases(adamw_step, cfg, g):
    """Decoupled decay shrinks matrices by (1 - lr wd) per step, but norm gains and biases are left alone
    (nanoGPT, most LLM recipes): with zero gradients a step moves gains and biases by exactly 0 and
    multiplies every matrix by exactly 1 - lr wd."""
    model = torch.nn.ModuleDict({"lm": Transformer(_model_config(cfg), generator=g),
                                 "value_head": torch.nn.Linear(cfg.d_model, 1)}).double()  # a head with a bias
    lr, wd = 0.1, 0.1
    optimizer, _ = M.configure_optimizer(model, M.OptimConfig(lr=lr, min_lr=lr, warmup_steps=0, weight_decay=wd), 10,
                                         step_fn=adamw_step)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = [max_error(p, b) for p, b in zip(model.parameters(), before) if p.dim() < 2]
    decay = [max_error(p, b * (1 - lr * wd)) / b.abs().max().item()
             for p, b in zip(model.parameters(), before) if p.dim() >= 2]
    return measure({"vector_change": moved, "matrix_decay_error": decay},
                   f"{len(moved)} gains/biases, {len(decay)} matrices")


# ---- Warmup + cosine schedule ------------------------------------------------------------------------

@training.check("< 1e-12", hint="the decay progress is (step - warmup) / (total - warmup), not step / total.")
def lr_schedule_hits_endpoints(cosine_schedule):
    """Warmup starts from 0 and reaches the peak at the end of warmup; the cosine ends at min_lr and
    stays there: lr(0) = 0, lr(W) = max, lr(S) = lr(S + 10) = min (relative to max)."""
    lr = lambda s: cosine_schedule(s, S, W, HI, LO)  # noqa: E731
    return [abs(lr(0)) / HI, abs(lr(W) - HI) / HI, abs(lr(S) - LO) / HI, abs(lr(S + 10) - LO) / HI]


@training.check("== 0", hint="half a cosine period over the decay: (1 + cos(pi * progress)) / 2, not "
                             "cos(2 pi progress).")
def lr_schedule_is_monotone_in_each_phase(cosine_schedule, ctx):
    """The learning rate only rises during warmup and only falls afterwards: no restart mid-run."""
    lrs = [cosine_schedule(s, S, W, HI, LO) for s in range(S + 11)]
    ctx.series("schedule/learning_rate", lrs, x_label="optimizer step", smooth=False,
               label="learning rate: linear warmup, cosine decay", y_label="learning rate")
    rising = sum(not b > a for a, b in zip(lrs[:W], lrs[1:W + 1]))  # "not >" also counts a NaN
    falling = sum(not b <= a for a, b in zip(lrs[W:], lrs[W + 1:]))
    against = rising + falling
    return measure(against, f"steps against the trend of {S + 10}")


@training.check("< 1e-12", hint="a linear decay also hits both endpoints but not the cosine's quarter points.")
def lr_schedule_decay_is_cosine(cosine_schedule):
    """The cosine decays slowly at first and last and fastest in the middle, where it passes
    (max + min) / 2; at a quarter of the decay it is min + (max - min)(1 + cos(pi/4)) / 2."""
    errors = []
    for frac in (0.25, 0.5, 0.75):
        want = LO + (HI - LO) * (1 + math.cos(math.pi * frac)) / 2
        errors.append(abs(cosine_schedule(W + round(frac * (S - W)), S, W, HI, LO) - want) / HI)
    return errors


@training.check("< 1e-12", hint="in the loop: optimizer.step() with the current lr, THEN scheduler.step(); the "
                                "other order skips lr(0) and shifts the whole schedule by one step.")
def optimizer_step_uses_the_lr_of_its_step(adamw_step, cosine_schedule, cfg, g):
    """train() must apply lr(s) at optimizer step s, starting with lr(0) (0 with warmup, as HF): a
    scheduler stepped before the optimizer runs the whole schedule one step early."""
    used: list[float] = []

    def recording_step(*args):
        used.append(args[5])  # lr
        return adamw_step(*args)

    model = Transformer(_model_config(cfg), generator=g)
    steps, warmup = 6, 3
    optim = M.OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=warmup)
    optimizer, scheduler = M.configure_optimizer(model, optim, steps, step_fn=recording_step, schedule=cosine_schedule)
    history = M.train(model, _batches(cfg, g), optimizer, scheduler, steps, generator=g)
    per_step = used[:: len(list(model.parameters()))]  # every parameter gets the same lr within a step
    want = [cosine_schedule(s, steps, warmup, cfg.lr, cfg.lr / 10) for s in range(steps)]
    if len(per_step) != steps:
        return measure(math.inf, f"{len(per_step)} optimizer steps for {steps}")
    return [abs(a - b) / cfg.lr for a, b in zip(per_step, want)] + [abs(h["lr"] - b) / cfg.lr
                                                                    for h, b in zip(history, want)]


# ---- Accumulation, clipping, perplexity ----------------------------------------------------------------

@training.check("< 1e-12", hint="averaging per-micro-batch means weights the tokens of sparse micro-batches more.")
def grad_accumulation_equals_big_batch(cfg, g):
    """Sum each micro-batch's token losses and divide by the whole batch's token count: then the
    accumulated gradient is exactly the big-batch gradient (float64, 4 micro-batches, uneven masks;
    relative to the largest gradient entry)."""
    model = Transformer(_model_config(cfg), generator=g).double()
    x, y = _batches(cfg, g)(g)
    y[torch.rand(y.shape, generator=g) < torch.linspace(0.0, 0.9, y.shape[0])[:, None]] = M.IGNORE_INDEX
    nll, n = M.lm_nll(model, x, y)
    (nll / n).backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    M.accumulate_gradients(model, x, y, micro_batches=4)
    scale = worst([b.abs().max() for b in big])  # NaN-aware
    return [max_error(p.grad, b) / scale for p, b in zip(model.parameters(), big)]


@training.check({"grad_error": "< 1e-6", "norm_error": "< 1e-9"},
                hint="per-tensor clipping changes the direction; scaling up small gradients is not clipping.")
def clip_matches_torch_clip_grad_norm(clip_grad_global_norm, g):
    """Clipping rescales all gradients by one factor so the global L2 norm is at most max_norm: the same
    gradients and norm as torch.nn.utils.clip_grad_norm_, in a case that clips and one that does not."""
    grad_errors, norm_errors = [], []
    for max_norm in (0.5, 1e3):
        grads = _grads(g, 3.0)
        params = [torch.zeros_like(t, requires_grad=True) for t in grads]
        for p, t in zip(params, grads):
            p.grad = t.clone()
        torch_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        clipped, total = clip_grad_global_norm([t.clone() for t in grads], max_norm)
        grad_errors += [max_error(c, p.grad) for c, p in zip(clipped, params)]
        norm_errors.append(abs(float(total) - float(torch_norm)))
    return {"grad_error": grad_errors, "norm_error": norm_errors}


@training.check("< 1e-5", hint="one norm over all tensors: clipping each tensor to max_norm leaves the "
                                              "global norm up to sqrt(#tensors) times too large.")
def clipped_global_norm_equals_max_norm(clip_grad_global_norm, g):
    """Above the threshold the clipped gradients have global norm max_norm (up to the 1e-6 guard), for
    max_norm from 0.1 to 10: clipping bounds the update size of the whole model. Measured:
    |clipped norm / max_norm - 1|."""
    deviations = []
    for max_norm in (0.1, 1.0, 10.0):
        grads = _grads(g, 10.0)  # global norm about 70
        clipped, _ = clip_grad_global_norm(grads, max_norm)
        deviations.append(abs(_global_norm(clipped) / max_norm - 1))
    return deviations


@training.check("== 0", hint="scale = min(1, max_norm / norm): clipping never scales gradients up.")
def clip_leaves_small_gradients_unchanged(clip_grad_global_norm, g):
    """Below the threshold clipping is the identity: a gradient already small enough is not rescaled
    to max_norm (that would be normalisation, not clipping)."""
    changes = []
    for max_norm in (20.0, 1e3):
        grads = _grads(g, 1.0)  # global norm about 8
        clipped, _ = clip_grad_global_norm([t.clone() for t in grads], max_norm)
        changes += [max_error(c, t) for c, t in zip(clipped, grads)]
    return changes


@training.check({"relative_error": "< 1e-12", "uniform_minus_V": "< 1e-12"},
                hint="pool the NLL over all scored tokens; averaging per-sequence perplexities is a different number.")
def perplexity_is_exp_mean_nll(cfg, g):
    """Perplexity is exp of the average negative log-likelihood per token, pooled over tokens (not a
    mean of per-sequence perplexities): a uniform guess over V tokens scores exactly V."""
    logits = torch.randn(4, 10, cfg.n_states, generator=g, dtype=F64) * 2
    targets = torch.randint(0, cfg.n_states, (4, 10), generator=g)
    targets[0, 3:] = M.IGNORE_INDEX  # sequences with different numbers of scored tokens
    targets[2, 6:] = M.IGNORE_INDEX
    kept = targets != M.IGNORE_INDEX
    by_hand = -logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0][kept].mean()
    ppl = M.perplexity(logits, targets)
    uniform = M.perplexity(torch.zeros_like(logits), targets)
    return measure({"relative_error": abs(ppl / math.exp(by_hand.item()) - 1),
                    "uniform_minus_V": abs(uniform - cfg.n_states) / cfg.n_states},
                   f"ppl {ppl:.4f}, uniform {uniform:.6f} (V={cfg.n_states})")


def _train_losses(run: tuple, n: int, optim: M.OptimConfig, next_batch, clip_fn) -> list[float]:
    model, optimizer, scheduler, generator = run
    return [h["loss"] for h in M.train(model, next_batch, optimizer, scheduler, n, generator=generator,
                                       grad_clip=optim.grad_clip, micro_batches=optim.micro_batches,
                                       clip_fn=clip_fn)]


# ---- Checkpoint resume ---------------------------------------------------------------------------------

@training.check({"max_param_diff": "== 0", "loss_mismatches": "== 0"},
                hint="forgetting the optimizer state restarts Adam's bias correction; forgetting the data "
                     "generator replays or skips batches.")
def resume_from_checkpoint_is_bit_identical(adamw_step, cosine_schedule, clip_grad_global_norm, cfg, ctx, g):
    """A checkpoint must hold weights, optimizer moments and step counts, the scheduler position and the
    RNG states; then stopping and resuming changes nothing, to the last bit (the same operations on the
    same machine)."""
    next_batch = _batches(cfg, g)
    optim = M.OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=2, micro_batches=cfg.micro_batches)
    R = cfg.resume_steps

    def fresh(init_seed: int, data_seed: int):
        model = Transformer(_model_config(cfg), generator=torch.Generator().manual_seed(init_seed))
        opt, sched = M.configure_optimizer(model, optim, 2 * R, step_fn=adamw_step, schedule=cosine_schedule)
        return model, opt, sched, torch.Generator().manual_seed(data_seed)

    straight = fresh(ctx.seed, ctx.seed + 1)
    losses_straight = _train_losses(straight, 2 * R, optim, next_batch, clip_grad_global_norm)
    first = fresh(ctx.seed, ctx.seed + 1)
    losses_resumed = _train_losses(first, R, optim, next_batch, clip_grad_global_norm)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        M.save_checkpoint(path, *first, step=R)
        second = fresh(ctx.seed + 100, ctx.seed + 200)  # other init and data stream: everything must be restored
        M.load_checkpoint(path, *second)
    losses_resumed += _train_losses(second, R, optim, next_batch, clip_grad_global_norm)
    diffs = [max_error(p, q) for p, q in zip(straight[0].parameters(), second[0].parameters())]
    return {"max_param_diff": diffs, "loss_mismatches": sum(a != b for a, b in zip(losses_straight, losses_resumed))}


# ---- Closed loop: a tiny Llama learns a Markov chain down to its entropy rate --------------------------

@training.fixture(cost=30)
def markov(cfg, ctx, g, adamw_step, cosine_schedule, clip_grad_global_norm):
    """M.run: the tiny Llama trained on a random chain with the three kernels, then scored on fresh sequences."""
    def on_step(step: int, record: dict) -> None:
        ctx.log("train/loss", record["loss"], step, x_label="optimizer step", key=True,
                label="training loss (the Markov chain)", y_label="loss per token (nats)")
        ctx.log("train/learning_rate", record["lr"], step, x_label="optimizer step", smooth=False,
                label="learning rate", y_label="learning rate (AdamW step size)")
        ctx.log("train/grad_norm", record["grad_norm"], step, x_label="optimizer step",
                label="gradient norm before clipping", y_label="gradient L2 norm")
        ctx.progress(step + 1, cfg.steps)

    model = Transformer(_model_config(cfg), generator=g)
    return M.run(cfg, g, model=model, adamw_step=adamw_step, cosine_schedule=cosine_schedule,
                 clip_grad_global_norm=clip_grad_global_norm, on_step=on_step)


@training.check("<= max_excess_ppl", kind="outcome",
                hint="a diverging loss points at the optimizer or the schedule; a plateau at log V at the data.")
def markov_perplexity_near_entropy_rate(markov):
    """On a Markov chain the best possible perplexity is exp(entropy rate); a model trained with these
    utilities gets within a few percent of it on held-out sequences: ppl / exp(H) - 1."""
    return measure(markov.excess, f"ppl {markov.perplexity:.4f} vs optimum exp(H) {markov.optimal_perplexity:.4f}")


@training.report
def headline(ctx, markov):
    ctx.scalar("held-out perplexity", markov.perplexity)
    ctx.scalar("optimal perplexity exp(H)", markov.optimal_perplexity)
    ctx.scalar("perplexity / optimum", markov.perplexity / markov.optimal_perplexity)
    ctx.scalar("uniform perplexity (V)", markov.uniform_perplexity)
    ctx.scalar("last-token-only optimum / optimum", markov.last_token_perplexity / markov.optimal_perplexity)
    ctx.scalar("first train loss", markov.history[0]["loss"])
    ctx.scalar("last train loss", markov.history[-1]["loss"])
