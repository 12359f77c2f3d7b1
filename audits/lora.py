"""Audit of LoRA (day 15): B = 0 at init, merge = unmerged, only A and B learn, r (d_in + d_out)
parameters, and LoRA against full fine-tuning on the copy -> swap task."""
from __future__ import annotations

import copy

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules.lora import lora as M


def _forward_example() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 3, 6, generator=g), "weight": torch.randn(5, 6, generator=g),
            "lora_A": torch.randn(2, 6, generator=g), "lora_B": torch.randn(5, 2, generator=g), "scaling": 4.0}


def _merge_example() -> dict:
    ex = _forward_example()
    return {k: ex[k] for k in ("weight", "lora_A", "lora_B", "scaling")}


KERNELS = [
    kernel(M.lora_forward, example=_forward_example,
           hint="h = x W0^T + scaling * (x A^T) B^T; A is (r, d_in), B is (d_out, r); keep the graph to A and B."),
    kernel(M.merge_lora, example=_merge_example,
           hint="W = W0 + scaling * B @ A (B first: (d_out, r) @ (r, d_in)); return a new tensor."),
]

lora = Audit("lora", day=15, title="LoRA: a frozen base plus a low-rank update, against full fine-tuning",
             config=M.LoRAConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _random_adapter(g: torch.Generator, d_in: int = 24, d_out: int = 16, r: int = 4) -> dict:
    return {"weight": torch.randn(d_out, d_in, generator=g), "lora_A": torch.randn(r, d_in, generator=g) / 5,
            "lora_B": torch.randn(d_out, r, generator=g) / 5, "scaling": 8.0 / r}


def _adapted(cfg, g, lora_forward, base=None):
    """(base model, adapted copy) with cfg's adapters; the base has random weights unless given."""
    base = base if base is not None else M.Transformer(M.model_config(cfg), generator=g)
    model = copy.deepcopy(base)
    M.add_lora(model, cfg.rank, cfg.alpha, cfg.targets, use_rslora=cfg.use_rslora, generator=g, forward_fn=lora_forward)
    return base, model


def _randomize_B(model, g) -> None:
    with torch.no_grad():
        for m in M.adapters(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@lora.fixture
def tokens(cfg, g):
    """A batch of the new task's inputs."""
    return M.task_batch(cfg, cfg.new_task, 16, g)[0]


# ---- invariants: init, merge, gradients, counts ------------------------------------------------------

@lora.check("< 1e-6", hint="B starts at zeros (A is the random one): then B A = 0 and nothing changes.")
def output_equals_base_at_init(lora_forward, cfg, g, tokens):
    """With B = 0 the update s B A is exactly 0, so the adapted model computes the base model's logits:
    fine-tuning starts from the pretrained model, not from a perturbed one."""
    base, model = _adapted(cfg, g, lora_forward)
    with torch.no_grad():
        return measure(max_error(model(tokens), base(tokens)), f"{len(M.adapters(model))} adapters")


@lora.check({"kernel": "< 1e-5", "model": "< 1e-5"},
            hint="merge adds scaling * B @ A to W0; the forward scales the low-rank path by the same scaling.")
def merged_weights_match_unmerged_adapter(lora_forward, merge_lora, cfg, g, tokens):
    """Serving a merged W = W0 + s B A gives what the adapter computes, so LoRA adds no latency at
    inference (random non-zero B; random inputs and the model's logits)."""
    case = _random_adapter(g)
    x = torch.randn(5, 24, generator=g)
    direct = lora_forward(x, **case)
    merged = x @ merge_lora(**case).T
    _, model = _adapted(cfg, g, lora_forward)
    _randomize_B(model, g)
    with torch.no_grad():
        before = model(tokens)
        M.merge_all(model, merge_lora)
        after = model(tokens)
    return {"kernel": max_error(merged, direct), "model": max_error(after, before)}


@lora.check("< 1e-6", hint="unmerge subtracts exactly what merge added: merge_lora(W, A, B, -scaling).")
def unmerge_restores_base_weights(merge_lora, cfg, g):
    """Merge then unmerge gives W0 back up to float rounding (W0 + D - D), so one base can switch
    adapters; with a power-of-two update it is bit for bit."""
    _, model = _adapted(cfg, g, M.lora_forward)
    _randomize_B(model, g)
    originals = [m.base.weight.detach().clone() for m in M.adapters(model)]
    M.merge_all(model, merge_lora)
    moved = max(max_error(m.base.weight, w) for m, w in zip(M.adapters(model), originals))
    M.unmerge_all(model, merge_lora)
    return measure(max(max_error(m.base.weight, w) for m, w in zip(M.adapters(model), originals)),
                   f"merge moved the weights by up to {moved:.3g}")


@lora.check({"frozen_with_gradient": "== 0", "adapters_without_gradient": "== 0"},
            hint="freeze every base parameter (requires_grad False) before adding A, B; never detach A or B.")
def only_adapters_receive_gradients(lora_forward, cfg, g, tokens):
    """The frozen W0 gets no gradient (hence no optimizer state: that is the memory LoRA saves), while
    every A and B does (B random here, so A's gradient B^T dL/dh is non-zero too)."""
    _, model = _adapted(cfg, g, lora_forward)
    _randomize_B(model, g)
    loss = model(tokens).logsumexp(-1).mean()
    if loss.requires_grad:  # nothing to differentiate when every path to A and B is cut
        loss.backward()
    lora_ids = {id(p) for m in M.adapters(model) for p in (m.lora_A, m.lora_B)}
    frozen = sum(p.grad is not None and id(p) not in lora_ids for p in model.parameters())
    starved = sum(p.grad is None or not bool(p.grad.abs().sum() > 0) for p in model.parameters() if id(p) in lora_ids)
    return {"frozen_with_gradient": frozen, "adapters_without_gradient": starved}


@lora.check({"count_minus_formula": "== 0", "fraction": "<= max_trainable_fraction"},
            hint="only A (r, d_in) and B (d_out, r) of each adapted matrix may require grad.")
def trainable_count_matches_formula(cfg, g):
    """Trainable parameters are sum r (d_in + d_out) over the adapted matrices, about 2 % of this model
    (v_proj and o_proj at r = 4), instead of every d_in d_out."""
    base, model = _adapted(cfg, g, M.lora_forward)
    formula = sum(M.lora_param_count(m.base.weight.shape[1], m.base.weight.shape[0], m.r) for m in M.adapters(model))
    total = sum(p.numel() for p in base.parameters())
    count = M.trainable_parameters(model)
    return measure({"count_minus_formula": count - formula, "fraction": count / total},
                   f"{count} of {total} parameters")


# ---- the closed loop: copy -> swap, full fine-tuning vs LoRA ---------------------------------------

@lora.fixture(cost=20)
def trained(ctx, cfg, g, lora_forward):
    """The base model (copy), then full fine-tuning, LoRA and the rank sweep on the swap task."""
    return M.run(cfg, g, lora_forward=lora_forward, on_progress=ctx.progress)


@lora.check({"base": "<= max_base_accuracy", "full": ">= min_full_accuracy"}, kind="outcome",
            hint="the base must not already do the new task, and full fine-tuning must learn it.")
def full_finetuning_learns_the_new_task(trained):
    """The base model copies the string (it swaps almost nothing right); full fine-tuning of every
    parameter learns the swap: the reference LoRA is compared with."""
    return measure({"base": trained.base_accuracy, "full": trained.full.accuracy},
                   f"base on its own task {trained.base_task_accuracy:.3f}")


@lora.check("<= max_gap_to_full", kind="outcome",
            hint="a scaling without alpha, B not trained, or a too-small learning rate leaves LoRA behind.")
def lora_matches_full_finetuning(trained):
    """LoRA with r = 4 on v_proj and o_proj trains ~2 % of the parameters and reaches full fine-tuning's
    exact match within the bar: the swap changes the token map by rank n_swaps = 3."""
    gap = trained.full.accuracy - trained.lora.accuracy
    return measure(gap, f"full {trained.full.accuracy:.3f}, LoRA {trained.lora.accuracy:.3f}, "
                        f"{trained.lora.trainable} vs {trained.full.trainable} trainable")


@lora.check("< 1e-3", kind="outcome", hint="a merge that drops the scaling changes the served model.")
def merged_model_keeps_its_accuracy(trained, cfg, merge_lora):
    """The trained adapter merged into W0 serves with the same exact match and the same logits."""
    model = copy.deepcopy(trained.lora.model)
    inputs = trained.eval_batch[0]
    with torch.no_grad():
        before = model(inputs)
        M.merge_all(model, merge_lora)
        after = model(inputs)
    merged_acc = M.exact_match(model, cfg, cfg.new_task, trained.eval_batch)
    return measure(max(abs(merged_acc - trained.lora.accuracy), max_error(after, before)),
                   f"exact match {trained.lora.accuracy:.3f} -> {merged_acc:.3f}")


@lora.fixture(cost=5)
def scaling(cfg, g, trained, lora_forward):
    """Short LoRA runs at a small and a large rank, alpha fixed, under alpha/r and alpha/sqrt(r)."""
    return M.scaling_effect(trained.base, cfg, g, trained.eval_batch, lora_forward)


@lora.check(">= min_rslora_gain", kind="outcome",
            hint="rsLoRA's scaling is alpha / sqrt(r); with alpha / r a larger rank learns no larger update.")
def rslora_lets_higher_rank_move_further(scaling, cfg):
    """At fixed alpha, alpha/r shrinks each rank's share as r grows, so r = 32 learns an update no larger
    than r = 2 does; alpha/sqrt(r) lets the larger rank move further (the ratio of ratios is measured)."""
    small, large = (int(v) for v in cfg.scaling_ranks.split(","))
    std = scaling["alpha/r"][large] / scaling["alpha/r"][small]
    rs = scaling["alpha/sqrt(r)"][large] / scaling["alpha/sqrt(r)"][small]
    return measure(rs / std, f"||s BA|| r={large} / r={small}: alpha/r {std:.2f}, alpha/sqrt(r) {rs:.2f}")


@lora.report
def curves(ctx, trained, scaling, cfg):
    ctx.series("train/loss", [h["loss"] for h in trained.full.history], x_label="fine-tuning step",
               label="full fine-tuning loss", y_label="loss per answer token (nats)", group="loss")
    ctx.series("train/loss_lora", [h["loss"] for h in trained.lora.history], x_label="fine-tuning step",
               label=f"LoRA r={cfg.rank} loss", y_label="loss per answer token (nats)", group="loss", key=True)
    ctx.scalar("base model on its own task (copy)", trained.base_task_accuracy)
    ctx.scalar("base model on the new task (swap)", trained.base_accuracy)
    ctx.scalar("full fine-tuning exact match", trained.full.accuracy)
    ctx.scalar(f"LoRA r={cfg.rank} exact match", trained.lora.accuracy)
    ctx.scalar("trainable fraction (LoRA)", trained.lora.trainable / trained.total_parameters)
    small, large = (int(v) for v in cfg.scaling_ranks.split(","))
    for key, sizes in scaling.items():
        ctx.scalar(f"update size r={large} / r={small}, {key}", sizes[large] / sizes[small])
    if trained.rank_sweep:
        ranks = sorted(trained.rank_sweep)
        for r in ranks:
            ctx.scalar(f"rank sweep: r={r} exact match", trained.rank_sweep[r].accuracy)
        ctx.series("sweep/exact_match", [trained.rank_sweep[r].accuracy for r in ranks], ranks, x_label="rank r",
                   smooth=False, label="LoRA exact match by rank", y_label="exact match", key=True)
        ctx.table("Rank sweep", ["r", "trainable", "fraction", "exact match"],
                  [[r, trained.rank_sweep[r].trainable, trained.rank_sweep[r].trainable / trained.total_parameters,
                    trained.rank_sweep[r].accuracy] for r in ranks])
    ctx.table("alpha/r vs alpha/sqrt(r): size of the learned update ||s B A||",
              ["scaling", *[f"r={r}" for r in sorted(scaling["alpha/r"])]],
              [[k, *[v[r] for r in sorted(v)]] for k, v in scaling.items()])
