"""training: AdamW vs torch, schedule vs transformers, accumulation, clipping, checkpoints, the audit, mutants."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from hypothesis import given, settings
from hypothesis import strategies as st

import modules.training.training as TR
from llmaudit.registry import get_audit
from modules import training as M
from modules import transformer as T

TINY = T.ModelConfig(vocab_size=12, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=88)


def _batch(seed: int = 0, B: int = 6, L: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 12, (B, L), generator=g)
    return x, torch.roll(x, -1, dims=1)


# --- AdamW -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_is_bit_identical_to_torch(dtype):
    model = T.Transformer(TINY, generator=torch.Generator().manual_seed(0)).to(dtype)
    diffs = M.adamw_vs_torch(model, lambda g: _batch(int(torch.randint(1000, (1,), generator=g))), 15,
                             torch.Generator().manual_seed(1), lr=3e-3)
    assert diffs == [0.0] * 15


def test_adamw_vs_torch_sees_an_l2_adam():
    def l2(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
        return M.adamw_step(param, grad + weight_decay * param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, 0.0)

    model = T.Transformer(TINY, generator=torch.Generator().manual_seed(0)).double()
    diffs = M.adamw_vs_torch(model, lambda g: _batch(0), 3, torch.Generator().manual_seed(1), step_fn=l2)
    assert min(diffs) > 1e-6


def test_weight_decay_groups_decay_matrices_only():
    model = torch.nn.ModuleDict({"lm": T.Transformer(TINY), "head": torch.nn.Linear(32, 1)})
    decay, no_decay = M.weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in M.weight_decay_groups(torch.nn.Linear(3, 3, bias=False), 0.1)] == [0.1]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 50), st.floats(1e-4, 1e-1), st.floats(0.0, 0.3))
def test_adamw_step_equals_textbook_formula(seed, step, lr, wd):
    g = torch.Generator().manual_seed(seed)
    p, grad, m = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.rand(5, generator=g, dtype=torch.float64)
    b1, b2, eps = 0.9, 0.95, 1e-8
    new_p, new_m, new_v = M.adamw_step(p, grad, m, v, step, lr, b1, b2, eps, wd)
    m_ref = b1 * m + (1 - b1) * grad
    v_ref = b2 * v + (1 - b2) * grad ** 2
    p_ref = p * (1 - lr * wd) - lr * (m_ref / (1 - b1 ** step)) / ((v_ref / (1 - b2 ** step)).sqrt() + eps)
    assert torch.allclose(new_m, m_ref, atol=1e-14) and torch.allclose(new_v, v_ref, atol=1e-14)
    assert torch.allclose(new_p, p_ref, atol=1e-12)


def test_first_adam_step_moves_each_weight_by_lr():  # bias correction: |m_hat / sqrt(v_hat)| = 1 at t=1
    p = torch.zeros(4, dtype=torch.float64)
    new_p, _, _ = M.adamw_step(p, torch.tensor([3.0, -0.1, 1e-3, -50.0], dtype=torch.float64), torch.zeros_like(p),
                               torch.zeros_like(p), 1, 0.01, 0.9, 0.999, 0.0, 0.0)
    assert torch.allclose(new_p, torch.tensor([-0.01, 0.01, -0.01, 0.01], dtype=torch.float64), atol=1e-15)


def test_optimizer_state_dict_round_trip():
    torch.manual_seed(0)
    model = T.Transformer(TINY)
    opt, _ = M.configure_optimizer(model, M.OptimConfig(), 10)
    nll, n = M.lm_nll(model, *_batch())
    (nll / n).backward()
    opt.step()
    clone = copy.deepcopy(model)
    opt2, _ = M.configure_optimizer(clone, M.OptimConfig(), 10)
    opt2.load_state_dict(opt.state_dict())
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.1, 0.0]  # norms are not decayed
    for p, q in zip(model.parameters(), clone.parameters()):
        assert opt2.state[q]["step"] == 1 and torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


# --- Schedule --------------------------------------------------------------------------------------


def test_schedule_equals_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100)
    for step in range(101):
        assert abs(opt.param_groups[0]["lr"] - M.cosine_schedule(step, 100, 10, 1.0, 0.0)) < 1e-12, step
        opt.step()
        sched.step()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 50), st.integers(1, 300), st.floats(1e-5, 1.0), st.floats(0.0, 1.0))
def test_schedule_bounds_and_monotonicity(warmup, decay, max_lr, min_frac):
    total, min_lr = warmup + decay, max_lr * min_frac
    lrs = [M.cosine_schedule(s, total, warmup, max_lr, min_lr) for s in range(total + 5)]
    assert all(0 <= lr <= max_lr + 1e-15 for lr in lrs)
    assert all(b >= a for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))
    assert all(b <= a + 1e-15 for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert abs(lrs[warmup] - max_lr) < 1e-12 and all(abs(lr - min_lr) < 1e-12 for lr in lrs[total:])


def test_scheduler_object_state_round_trip():
    model = T.Transformer(TINY)
    opt, sched = M.configure_optimizer(model, M.OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4), 20)
    for _ in range(7):
        sched.step()
    opt2, sched2 = M.configure_optimizer(model, M.OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4), 20)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == M.cosine_schedule(7, 20, 4, 1.0, 0.1)


# --- Clipping, accumulation, perplexity -------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-3, 100.0))
def test_clip_equals_torch_clip_grad_norm(seed, max_norm):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 4), (7,), (2, 2, 2))]
    params = [torch.zeros_like(t, requires_grad=True) for t in grads]
    for p, t in zip(params, grads):
        p.grad = t.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    clipped, total = M.clip_grad_global_norm(grads, max_norm)
    assert torch.allclose(total, norm, rtol=1e-14)
    assert all(torch.allclose(c, p.grad, rtol=1e-14, atol=0) for c, p in zip(clipped, params))
    assert all(torch.equal(c, t) for c, t in zip(clipped, grads)) or math.isclose(
        math.sqrt(sum(float(c.pow(2).sum()) for c in clipped)), max_norm, rel_tol=1e-5)


@pytest.mark.parametrize("micro", [1, 2, 3, 6])
def test_accumulated_gradient_equals_big_batch(micro):
    torch.manual_seed(0)
    model = T.Transformer(TINY).double()
    x, y = _batch(B=6)
    y[0, 2:] = M.IGNORE_INDEX  # uneven token counts across micro-batches
    y[3, 5:] = M.IGNORE_INDEX
    nll, n = M.lm_nll(model, x, y)
    (nll / n).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = M.accumulate_gradients(model, x, y, micro)
    assert abs(loss - (nll / n).item()) < 1e-12
    assert all(torch.allclose(p.grad, w, atol=1e-14) for p, w in zip(model.parameters(), want))


def test_perplexity_of_uniform_and_perfect_models():
    targets = torch.randint(0, 7, (3, 5))
    assert abs(M.perplexity(torch.zeros(3, 5, 7, dtype=torch.float64), targets) - 7) < 1e-12
    perfect = torch.full((3, 5, 7), -1e4, dtype=torch.float64).scatter(-1, targets[..., None], 0.0)
    assert abs(M.perplexity(perfect, targets) - 1.0) < 1e-12


def test_entropy_given_last_token_is_the_rate_for_order_one_and_larger_for_order_two():
    P1, pi1 = M.markov_chain(5, 1, 1.5, torch.Generator().manual_seed(0))
    assert abs(M.entropy_given_last_token(P1, pi1) - M.entropy_rate(P1, pi1)) < 1e-12
    P2, pi2 = M.markov_chain(5, 2, 1.5, torch.Generator().manual_seed(0))
    assert M.entropy_given_last_token(P2, pi2) > M.entropy_rate(P2, pi2) + 0.1


def test_markov_chain_entropy_rate_matches_empirical_nll():
    P, pi = M.markov_chain(5, 2, 1.5, torch.Generator().manual_seed(0))
    assert torch.allclose(P.sum(-1), torch.ones(25, dtype=torch.float64))
    seq = M.sample_markov(P, pi, 2000, 40, torch.Generator().manual_seed(1))
    context = seq[:, :-2] * 5 + seq[:, 1:-1]
    nll = -P[context, seq[:, 2:]].log().mean().item()
    assert abs(nll - M.entropy_rate(P, pi)) < 0.02


def test_resume_restores_everything(tmp_path):
    P, pi = M.markov_chain(12, 1, 2.0, torch.Generator().manual_seed(0))
    batches = lambda g: (lambda s: (s[:, :-1], s[:, 1:]))(M.sample_markov(P, pi, 8, 11, g))  # noqa: E731

    def fresh(seed):
        torch.manual_seed(seed)
        model = T.Transformer(TINY)
        return (model, *M.configure_optimizer(model, M.OptimConfig(warmup_steps=2, micro_batches=2), 8),
                torch.Generator().manual_seed(seed))

    a = fresh(0)
    M.train(a[0], batches, a[1], a[2], 8, generator=a[3], micro_batches=2)
    b = fresh(0)
    M.train(b[0], batches, b[1], b[2], 4, generator=b[3], micro_batches=2)
    M.save_checkpoint(tmp_path / "c.pt", *b, step=4)
    c = fresh(7)
    assert M.load_checkpoint(tmp_path / "c.pt", *c) == 4
    M.train(c[0], batches, c[1], c[2], 4, generator=c[3], micro_batches=2)
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), c[0].parameters()))


# --- run() without the engine ----------------------------------------------------------------------


def test_run_is_reproducible_and_learns():
    cfg = M.TrainingConfig(steps=30, warmup_steps=3, eval_sequences=64)
    results = []
    for _ in range(2):
        model = T.Transformer(T.ModelConfig(vocab_size=12, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=88),
                              generator=torch.Generator().manual_seed(0))
        results.append(M.run(cfg, torch.Generator().manual_seed(1), model=model))
    a, b = results
    assert a.history == b.history and a.perplexity == b.perplexity
    assert a.history[-1]["loss"] < a.history[0]["loss"] - 0.3
    assert a.optimal_perplexity < a.perplexity < a.uniform_perplexity


# --- The audit -------------------------------------------------------------------------------------


def test_audit_passes_toy():
    r = audit_once("training", "toy")
    assert r.passed, [c for c in r.checks if not c.passed] or r.error
    assert {c.kind for c in r.checks} == {"invariant", "outcome"}
    assert "train/loss" in r.series and "held-out perplexity" in r.scalars


@pytest.mark.slow
def test_audit_passes_full():
    r = audit_once("training", "full", 1)
    assert r.passed, [c for c in r.checks if not c.passed] or r.error


def test_same_seed_same_result():
    first, second = audit_once("training", "toy", 2), audit_once("training", "toy", 2)
    assert first.deterministic_dict() == second.deterministic_dict()


def test_grad_accumulation_and_perplexity_checks_claim_no_kernel():
    spec = get_audit("training")
    assert spec.check_spec("grad_accumulation_equals_big_batch").kernels == ()
    assert spec.check_spec("perplexity_is_exp_mean_nll").kernels == ()


def test_other_correct_kernels_pass():
    """A textbook AdamW, clipping without torch's 1e-6 and a differently written schedule pass every invariant."""
    def textbook(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
        m = beta1 * exp_avg + (1 - beta1) * grad
        v = beta2 * exp_avg_sq + (1 - beta2) * grad ** 2
        update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
        return param - lr * weight_decay * param - lr * update, m, v

    def clip_plain(grads, max_norm):
        total = torch.sqrt(sum((g ** 2).sum() for g in grads))
        scale = min(1.0, max_norm / float(total))
        return [g * scale for g in grads], total

    def schedule(step, total_steps, warmup_steps, max_lr, min_lr):
        if step < warmup_steps:
            return max_lr * step / warmup_steps
        ratio = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)

    invariants = [c.name for c in get_audit("training").checks_for("toy") if c.kind == "invariant"]
    r = audit_once("training", "toy", 0, only=invariants, adamw_step=textbook, clip_grad_global_norm=clip_plain,
                   cosine_schedule=schedule)
    assert r.passed, [(c.name, c.measured_text) for c in r.checks if not c.passed]


# --- Mutants: each breaks the property its check names, on every seed ------------------------------

ref_adamw, ref_schedule, ref_clip = M.adamw_step, M.cosine_schedule, M.clip_grad_global_norm


def adam_l2(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    return ref_adamw(param, grad + weight_decay * param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, 0.0)


def adam_eps_inside_sqrt(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    param = param * (1 - lr * weight_decay)
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    return param - lr * m / (1 - beta1 ** step) / (v / (1 - beta2 ** step) + eps).sqrt(), m, v


def adam_no_bias_correction(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    param = param * (1 - lr * weight_decay)
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    return param - lr * m / (v.sqrt() + eps), m, v


def adam_no_decay(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    return ref_adamw(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, 0.0)


def decay_everything(model, weight_decay):
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]


def schedule_to_zero(step, total_steps, warmup_steps, max_lr, min_lr):
    return ref_schedule(step, total_steps, warmup_steps, max_lr, 0.0)


def schedule_full_period(step, total_steps, warmup_steps, max_lr, min_lr):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    p = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(2 * math.pi * p))


def schedule_linear(step, total_steps, warmup_steps, max_lr, min_lr):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    return max_lr - (max_lr - min_lr) * min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))


_real_train = TR.train


def train_scheduler_first(model, next_batch, optimizer, scheduler, steps, **kwargs):
    """The loop with scheduler.step() before optimizer.step(): step s runs at lr(s + 1)."""
    class Early:
        def step(self):
            pass

    def step_then_optimize():
        scheduler.step()
        real_step()

    real_step = optimizer.step
    optimizer.step = step_then_optimize
    try:
        return _real_train(model, next_batch, optimizer, Early(), steps, **kwargs)
    finally:
        optimizer.step = real_step


def accumulate_mean_of_means(model, inputs, targets, micro_batches, loss_fn=M.lm_nll):
    for x, y in zip(inputs.chunk(micro_batches), targets.chunk(micro_batches)):
        nll, n = loss_fn(model, x, y)
        (nll / n / micro_batches).backward()
    return 0.0


def clip_per_tensor(grads, max_norm):
    return [g * (max_norm / (g.norm() + 1e-6)).clamp(max=1.0) for g in grads], ref_clip(grads, max_norm)[1]


def clip_always_rescales(grads, max_norm):
    total = torch.stack([g.norm() for g in grads]).norm()
    return [g * max_norm / (total + 1e-6) for g in grads], total


def perplexity_per_sequence(logits, targets, ignore_index=M.IGNORE_INDEX):
    ppls = [math.exp(M.token_nll(lg, t)[0].item() / max(1, int((t != ignore_index).sum())))
            for lg, t in zip(logits, targets)]
    return sum(ppls) / len(ppls)


_real_load = TR.load_checkpoint


def load_forgetting_optimizer_state(path, model, optimizer, scheduler, generator):
    step = _real_load(path, model, optimizer, scheduler, generator)
    optimizer.state = {}  # Adam moments and step counts lost
    return step


MUTANTS = [
    Mutant("adamw_matches_torch_adamw", "L2 instead of decoupled decay", {"adamw_step": adam_l2}),
    Mutant("adamw_matches_torch_adamw", "eps inside the sqrt", {"adamw_step": adam_eps_inside_sqrt}),
    Mutant("first_step_moves_every_weight_by_lr", "no bias correction", {"adamw_step": adam_no_bias_correction}),
    Mutant("weight_decay_skips_gains_and_biases", "decay on every parameter", patch=patched(TR, "weight_decay_groups",
                                                                                          decay_everything)),
    Mutant("weight_decay_skips_gains_and_biases", "weight decay ignored", {"adamw_step": adam_no_decay}),
    Mutant("lr_schedule_hits_endpoints", "decays to 0, not min_lr", {"cosine_schedule": schedule_to_zero}),
    Mutant("lr_schedule_is_monotone_in_each_phase", "a full cosine period", {"cosine_schedule": schedule_full_period}),
    Mutant("lr_schedule_decay_is_cosine", "linear decay", {"cosine_schedule": schedule_linear}),
    Mutant("optimizer_step_uses_the_lr_of_its_step", "scheduler stepped before the optimizer",
           patch=patched(TR, "train", train_scheduler_first)),
    Mutant("grad_accumulation_equals_big_batch", "mean of micro-batch means",
           patch=patched(TR, "accumulate_gradients", accumulate_mean_of_means)),
    Mutant("clip_matches_torch_clip_grad_norm", "each tensor clipped alone",
           {"clip_grad_global_norm": clip_per_tensor}),
    Mutant("clip_matches_torch_clip_grad_norm", "small gradients scaled up",
           {"clip_grad_global_norm": clip_always_rescales}),
    Mutant("clipped_global_norm_equals_max_norm", "each tensor clipped alone",
           {"clip_grad_global_norm": clip_per_tensor}),
    Mutant("clip_leaves_small_gradients_unchanged", "small gradients scaled up",
           {"clip_grad_global_norm": clip_always_rescales}),
    Mutant("perplexity_is_exp_mean_nll", "mean of per-sequence perplexities",
           patch=patched(TR, "perplexity", perplexity_per_sequence)),
    Mutant("resume_from_checkpoint_is_bit_identical", "optimizer state not restored",
           patch=patched(TR, "load_checkpoint", load_forgetting_optimizer_state)),
    Mutant("markov_perplexity_near_entropy_rate", "12 optimizer steps", overrides={"steps": "12", "warmup_steps": "2"}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("training", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("training", MUTANTS)
