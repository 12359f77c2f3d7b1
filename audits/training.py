"""Audit of the training utilities: AdamW vs torch, the schedule, accumulation, clipping, resume, perplexity."""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import torch

from llmaudit.audit import Context, audit, kernel
from modules import training as M
from modules import transformer as T


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


def _model_config(cfg: M.TrainingConfig) -> T.ModelConfig:
    return T.ModelConfig(vocab_size=cfg.n_states, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=4,
                         n_kv_heads=2, d_ff=(8 * cfg.d_model // 3 + 7) // 8 * 8, max_seq_len=cfg.seq_len)


def _markov_pairs(P: torch.Tensor, pi: torch.Tensor, cfg: M.TrainingConfig, n: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of n sequences; the first order-1 targets lack their full context: ignored."""
    seq = M.sample_markov(P, pi, n, cfg.seq_len + 1, generator)
    targets = seq[:, 1:].clone()
    targets[:, : cfg.order - 1] = M.IGNORE_INDEX
    return seq[:, :-1], targets


def _max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@audit("training", day=5, title="Training utilities: AdamW, warmup-cosine, accumulation, clipping, resume",
       config=M.TrainingConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_training(ctx: Context, *, adamw_step=M.adamw_step, cosine_schedule=M.cosine_schedule,
                   clip_grad_global_norm=M.clip_grad_global_norm) -> None:
    cfg: M.TrainingConfig = ctx.config
    g = ctx.generator(0)
    P, pi = M.markov_chain(cfg.n_states, cfg.order, cfg.sharpness, ctx.generator(1))
    next_batch = lambda gen: _markov_pairs(P, pi, cfg, cfg.batch_size, gen)  # noqa: E731
    mcfg = _model_config(cfg)

    # --- AdamW vs torch.optim.AdamW, step by step ---------------------------------------------
    def compare_adamw(dtype: torch.dtype) -> list[float]:
        ours = T.Transformer(mcfg).to(dtype)
        theirs = copy.deepcopy(ours)
        groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},  # noqa: E731
                            {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        opt_ours = M.AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, step_fn=adamw_step)
        opt_torch = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        data = torch.Generator().manual_seed(ctx.seed)
        diffs = []
        for _ in range(cfg.adam_compare_steps):
            x, y = next_batch(data)
            for model, opt in ((ours, opt_ours), (theirs, opt_torch)):
                nll, n = M.lm_nll(model, x, y)
                (nll / n).backward()
                opt.step()
                opt.zero_grad()
            diffs.append(_max_param_diff(ours, theirs))
        return diffs

    diffs64 = compare_adamw(torch.float64)
    diffs32 = compare_adamw(torch.float32)
    worst64 = max(diffs64)
    ctx.check("adamw_matches_torch_adamw", worst64 < 1e-10,
              f"max |Δθ| float64 {worst64:.3g}, float32 {max(diffs32):.3g} over {cfg.adam_compare_steps} steps",
              "max |θ_ours - θ_torch| < 1e-10 after every step (float64)",
              "AdamW = Adam on the loss gradient plus weight decay applied directly to the weights "
              "(decoupled), with bias-corrected moments.",
              hint="L2 (adding wd * theta to the gradient) is Adam, not AdamW; check the bias corrections and "
                   "that eps is added after the square root.")
    ctx.series("adamw/max_abs_diff_vs_torch", diffs64, x_label="optimizer step", smooth=False)
    ctx.scalar("adamw bit-identical to torch (float32)", max(diffs32) == 0.0)
    ctx.progress(0.15)

    # --- Warmup + cosine schedule --------------------------------------------------------------
    S, W, hi, lo = 200, 20, 3e-3, 3e-4
    lrs = [cosine_schedule(s, S, W, hi, lo) for s in range(S + 11)]
    ends = (lrs[0], lrs[W], lrs[S], lrs[S + 10])
    end_err = max(abs(ends[0]), abs(ends[1] - hi), abs(ends[2] - lo), abs(ends[3] - lo))
    ctx.check("lr_schedule_hits_endpoints", end_err < 1e-15,
              f"lr(0)={ends[0]:.3g}, lr(W)={ends[1]:.3g}, lr(S)={ends[2]:.3g}, lr(S+10)={ends[3]:.3g}",
              f"0, {hi:g}, {lo:g}, {lo:g}",
              "Warmup starts from 0 and reaches the peak at the end of warmup; the cosine ends at min_lr and "
              "stays there.",
              hint="the decay progress is (step - warmup) / (total - warmup), not step / total.")
    rises = all(b >= a for a, b in zip(lrs[:W], lrs[1:W + 1]))
    falls = all(b <= a for a, b in zip(lrs[W:], lrs[W + 1:]))
    ctx.check("lr_schedule_is_monotone_in_each_phase", rises and falls,
              f"warmup increasing: {rises}; decay non-increasing: {falls}", "both yes",
              "The learning rate only rises during warmup and only falls afterwards: no restart mid-run.",
              hint="half a cosine period over the decay: (1 + cos(pi * progress)) / 2, not cos(2 pi progress).")
    mid, quarter = lrs[W + (S - W) // 2], lrs[W + (S - W) // 4]
    cos_err = max(abs(mid - (hi + lo) / 2), abs(quarter - (lo + (hi - lo) * (1 + math.cos(math.pi / 4)) / 2)))
    ctx.check("lr_schedule_decay_is_cosine", cos_err < 1e-12, cos_err,
              "|lr(mid) - (max+min)/2| and |lr(quarter) - cosine value| < 1e-12",
              "The cosine decays slowly at first and last and fastest in the middle, where it passes "
              "(max + min) / 2.",
              hint="a linear decay also hits both endpoints but not the cosine quarter point.")
    ctx.series("schedule/learning_rate", lrs, x_label="optimizer step", smooth=False)
    ctx.progress(0.2)

    # --- Gradient accumulation with uneven masks -------------------------------------------------
    model = T.Transformer(mcfg).double()
    x, y = next_batch(g)
    y = y.clone()
    y[torch.rand(y.shape, generator=g) < torch.linspace(0.0, 0.9, y.shape[0])[:, None]] = M.IGNORE_INDEX
    nll, n = M.lm_nll(model, x, y)
    (nll / n).backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    M.accumulate_gradients(model, x, y, micro_batches=4)
    acc_err = max((p.grad - b).abs().max().item() for p, b in zip(model.parameters(), big))
    scale = max(b.abs().max().item() for b in big)
    ctx.check("grad_accumulation_equals_big_batch", acc_err < 1e-12 * max(1.0, scale), acc_err,
              "max |grad_accumulated - grad_big_batch| < 1e-12 (float64, 4 micro-batches, uneven masks)",
              "Sum each micro-batch's token losses and divide by the whole batch's token count: then the "
              "accumulated gradient is exactly the big-batch gradient.",
              hint="averaging per-micro-batch means weights the tokens of sparse micro-batches more.")

    # --- Global-norm clipping vs torch.nn.utils.clip_grad_norm_ --------------------------------
    clip_err, norm_err, above = 0.0, 0.0, 0.0
    for max_norm in (0.5, 1e3):  # one case that clips, one that must leave the gradients alone
        grads = [torch.randn(*shape, generator=g, dtype=torch.float64) * 3 for shape in ((8, 5), (5,), (3, 4, 2))]
        params = [torch.zeros_like(t, requires_grad=True) for t in grads]
        for p, t in zip(params, grads):
            p.grad = t.clone()
        torch_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        clipped, total = clip_grad_global_norm([t.clone() for t in grads], max_norm)
        clip_err = max(clip_err, max((c - p.grad).abs().max().item() for c, p in zip(clipped, params)))
        norm_err = max(norm_err, abs(float(total) - float(torch_norm)))
        above = max(above, math.sqrt(sum(float(c.pow(2).sum()) for c in clipped)) - max_norm)
    ctx.check("clip_matches_torch_clip_grad_norm", clip_err < 1e-6 and norm_err < 1e-9 and above <= 0,
              f"max |Δg| {clip_err:.3g}, |Δnorm| {norm_err:.3g}", "< 1e-6 and < 1e-9; clipped norm <= max_norm",
              "Clipping rescales all gradients by one factor so the global L2 norm is at most max_norm, keeping "
              "the update direction; gradients already below the threshold are left unchanged.",
              hint="per-tensor clipping changes the direction; scaling up small gradients is not clipping.")
    ctx.progress(0.3)

    # --- Perplexity -----------------------------------------------------------------------------
    logits = torch.randn(4, 10, cfg.n_states, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, cfg.n_states, (4, 10), generator=g)
    targets[0, 3:] = M.IGNORE_INDEX  # sequences with different numbers of scored tokens
    targets[2, 6:] = M.IGNORE_INDEX
    kept = targets != M.IGNORE_INDEX
    by_hand = -logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0][kept].mean()
    ppl = M.perplexity(logits, targets)
    uniform = M.perplexity(torch.zeros_like(logits), targets)
    ppl_err = max(abs(ppl / math.exp(by_hand.item()) - 1), abs(uniform / cfg.n_states - 1))
    ctx.check("perplexity_is_exp_mean_nll", ppl_err < 1e-12, f"ppl {ppl:.4f}, uniform {uniform:.6f} (V={cfg.n_states})",
              "ppl = exp(mean token NLL) to 1e-12; uniform logits give exactly V",
              "Perplexity is exp of the average negative log-likelihood per token, pooled over tokens: "
              "a uniform guess over V tokens scores V.",
              hint="pool the NLL over all scored tokens; averaging per-sequence perplexities is a different number.")

    # --- Checkpoint resume is bit-identical -----------------------------------------------------
    optim_cfg = M.OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=2, micro_batches=cfg.micro_batches)
    R = cfg.resume_steps

    def fresh(init_seed: int, data_seed: int):
        torch.manual_seed(init_seed)
        model = T.Transformer(mcfg)
        opt, sched = M.configure_optimizer(model, optim_cfg, 2 * R, step_fn=adamw_step, schedule=cosine_schedule)
        return model, opt, sched, torch.Generator().manual_seed(data_seed)

    def run(model, opt, sched, gen, steps):
        return M.train(model, next_batch, opt, sched, steps, generator=gen, grad_clip=optim_cfg.grad_clip,
                       micro_batches=optim_cfg.micro_batches, clip_fn=clip_grad_global_norm)

    straight = fresh(ctx.seed, ctx.seed + 1)
    losses_straight = [h["loss"] for h in run(*straight, 2 * R)]
    first = fresh(ctx.seed, ctx.seed + 1)
    losses_resumed = [h["loss"] for h in run(*first, R)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        M.save_checkpoint(path, first[0], first[1], first[2], first[3], step=R)
        second = fresh(ctx.seed + 100, ctx.seed + 200)  # different init and data stream: all must be restored
        M.load_checkpoint(path, second[0], second[1], second[2], second[3])
    losses_resumed += [h["loss"] for h in run(*second, R)]
    resume_diff = _max_param_diff(straight[0], second[0])
    same_losses = losses_straight == losses_resumed
    ctx.check("resume_from_checkpoint_is_bit_identical", resume_diff == 0.0 and same_losses,
              f"max |Δθ| {resume_diff:.3g}; losses identical: {same_losses}", "0 and yes",
              "A checkpoint must hold weights, optimizer moments and step counts, the scheduler position and "
              "the RNG states; then stopping and resuming changes nothing.",
              hint="forgetting the optimizer state restarts Adam's bias correction; forgetting the data "
                   "generator replays or skips batches.")
    ctx.progress(0.4)

    # --- Closed loop: a tiny Llama learns a Markov chain down to its entropy rate ---------------
    model = T.Transformer(mcfg)
    loop_cfg = M.OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=cfg.warmup_steps,
                             weight_decay=cfg.weight_decay, micro_batches=cfg.micro_batches)
    opt, sched = M.configure_optimizer(model, loop_cfg, cfg.steps, step_fn=adamw_step, schedule=cosine_schedule)

    def on_step(step: int, record: dict) -> None:
        ctx.log("train/loss", record["loss"], step)
        ctx.log("train/learning_rate", record["lr"], step)
        ctx.log("train/grad_norm", record["grad_norm"], step)
        ctx.progress(0.4 + 0.55 * (step + 1) / cfg.steps)

    history = M.train(model, next_batch, opt, sched, cfg.steps, generator=ctx.generator(2),
                      grad_clip=loop_cfg.grad_clip, micro_batches=loop_cfg.micro_batches,
                      clip_fn=clip_grad_global_norm, on_step=on_step)
    x_held, y_held = _markov_pairs(P, pi, cfg, cfg.eval_sequences, ctx.generator(3))
    model.eval()
    with torch.no_grad():
        ppl = M.perplexity(model(x_held), y_held)
    best = math.exp(M.entropy_rate(P, pi))
    ratio = ppl / best
    ctx.check("markov_perplexity_near_entropy_rate", ratio <= cfg.max_ppl_ratio,
              f"ppl {ppl:.4f} vs optimum exp(H) {best:.4f} (ratio {ratio:.4f})", f"ratio <= {cfg.max_ppl_ratio}",
              "On a Markov chain the best possible perplexity is exp(entropy rate); a model trained with these "
              "utilities gets within a few percent of it on held-out sequences.", kind="outcome",
              hint="a diverging loss points at the optimizer or the schedule; a plateau at log V at the data.")
    ctx.scalar("held-out perplexity", ppl)
    ctx.scalar("optimal perplexity exp(H)", best)
    ctx.scalar("uniform perplexity (V)", cfg.n_states)
    ctx.scalar("first / last train loss", f"{history[0]['loss']:.3f} / {history[-1]['loss']:.3f}")
    ctx.progress(1.0)
