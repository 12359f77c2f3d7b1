"""training: AdamW vs torch, schedule vs transformers, accumulation, clipping, checkpoints, the audit, mutants."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_check_fails, audit_once
from hypothesis import given, settings
from hypothesis import strategies as st

from modules import training as M
from modules import transformer as T

FAST = {"steps": "12", "warmup_steps": "2", "eval_sequences": "16", "adam_compare_steps": "2", "resume_steps": "2"}
TINY = T.ModelConfig(vocab_size=12, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=88)


def _batch(seed: int = 0, B: int = 6, L: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 12, (B, L), generator=g)
    return x, torch.roll(x, -1, dims=1)


# --- AdamW -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_is_bit_identical_to_torch(dtype):
    torch.manual_seed(0)
    ours_model = T.Transformer(TINY).to(dtype)
    torch_model = copy.deepcopy(ours_model)
    ours = M.AdamW(ours_model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(15):
        x, y = _batch(step)
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            nll, n = M.lm_nll(model, x, y)
            (nll / n).backward()
            opt.step()
            opt.zero_grad()
        for p, q in zip(ours_model.parameters(), torch_model.parameters()):
            assert torch.equal(p, q), step


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


# --- The audit -------------------------------------------------------------------------------------


def test_audit_passes_toy_and_full():
    r = audit_once("training", "toy")
    assert r.passed, [c for c in r.checks if not c.passed] or r.error
    for seed in (0, 1):
        r = audit_once("training", "full", seed)
        assert r.passed, [c for c in r.checks if not c.passed] or r.error


def test_same_seed_same_result():
    assert audit_once("training", "toy", 2).to_dict() == audit_once("training", "toy", 2).to_dict()


# --- mutants ---------------------------------------------------------------------------------------

ref_adamw, ref_schedule, ref_clip = M.adamw_step, M.cosine_schedule, M.clip_grad_global_norm


def _fast(**kernels):
    return audit_once("training", "toy", 0, overrides=FAST, **kernels)


def test_mutant_adam_with_l2_instead_of_decoupled_decay():
    def l2(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
        return ref_adamw(param, grad + weight_decay * param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, 0.0)

    assert_check_fails(_fast(adamw_step=l2), "adamw_matches_torch_adamw")


def test_mutant_adam_eps_inside_sqrt():
    def bad(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
        param = param * (1 - lr * weight_decay)
        m = beta1 * exp_avg + (1 - beta1) * grad
        v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        denom = (v / (1 - beta2 ** step) + eps).sqrt()
        return param - lr * m / (1 - beta1 ** step) / denom, m, v

    assert_check_fails(_fast(adamw_step=bad), "adamw_matches_torch_adamw")


def test_mutant_schedule_decays_to_zero():
    def bad(step, total_steps, warmup_steps, max_lr, min_lr):
        return ref_schedule(step, total_steps, warmup_steps, max_lr, 0.0)

    assert_check_fails(_fast(cosine_schedule=bad), "lr_schedule_hits_endpoints")


def test_mutant_schedule_full_cosine_period():
    def bad(step, total_steps, warmup_steps, max_lr, min_lr):
        if step < warmup_steps:
            return max_lr * step / warmup_steps
        p = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(2 * math.pi * p))

    assert_check_fails(_fast(cosine_schedule=bad), "lr_schedule_is_monotone_in_each_phase")


def test_mutant_schedule_linear_decay():
    def linear(step, total_steps, warmup_steps, max_lr, min_lr):
        if step < warmup_steps:
            return max_lr * step / warmup_steps
        p = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return max_lr - (max_lr - min_lr) * p

    r = _fast(cosine_schedule=linear)
    assert r.check("lr_schedule_hits_endpoints").passed and r.check("lr_schedule_is_monotone_in_each_phase").passed
    assert_check_fails(r, "lr_schedule_decay_is_cosine")


def test_mutant_accumulation_averages_micro_batch_means(monkeypatch):
    def mean_of_means(model, inputs, targets, micro_batches, loss_fn=M.lm_nll):
        for x, y in zip(inputs.chunk(micro_batches), targets.chunk(micro_batches)):
            nll, n = loss_fn(model, x, y)
            (nll / n / micro_batches).backward()
        return 0.0

    monkeypatch.setattr(M, "accumulate_gradients", mean_of_means)
    assert_check_fails(_fast(), "grad_accumulation_equals_big_batch")


def test_mutant_clip_each_tensor_separately():
    def per_tensor(grads, max_norm):
        return [g * (max_norm / (g.norm() + 1e-6)).clamp(max=1.0) for g in grads], ref_clip(grads, max_norm)[1]

    assert_check_fails(_fast(clip_grad_global_norm=per_tensor), "clip_matches_torch_clip_grad_norm")


def test_mutant_clip_scales_small_gradients_up():
    def always(grads, max_norm):
        total = torch.stack([g.norm() for g in grads]).norm()
        return [g * max_norm / (total + 1e-6) for g in grads], total

    assert_check_fails(_fast(clip_grad_global_norm=always), "clip_matches_torch_clip_grad_norm")


def test_mutant_perplexity_averaged_per_sequence(monkeypatch):
    def per_sequence(logits, targets, ignore_index=M.IGNORE_INDEX):
        ppls = [math.exp(M.token_nll(lg, t)[0].item() / max(1, int((t != ignore_index).sum())))
                for lg, t in zip(logits, targets)]
        return sum(ppls) / len(ppls)

    monkeypatch.setattr(M, "perplexity", per_sequence)
    assert_check_fails(_fast(), "perplexity_is_exp_mean_nll")


def test_mutant_checkpoint_forgets_optimizer_state(monkeypatch):
    real = M.load_checkpoint

    def forgetful(path, model, optimizer, scheduler, generator):
        step = real(path, model, optimizer, scheduler, generator)
        optimizer.state = {}  # Adam moments and step counts lost
        return step

    monkeypatch.setattr(M, "load_checkpoint", forgetful)
    assert_check_fails(_fast(), "resume_from_checkpoint_is_bit_identical")


def test_mutant_too_few_steps_does_not_reach_the_entropy_rate():
    assert_check_fails(_fast(), "markov_perplexity_near_entropy_rate")


def test_other_correct_kernels_pass():
    """A textbook AdamW, clipping without torch's 1e-6 and a differently written schedule all pass."""
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

    r = _fast(adamw_step=textbook, clip_grad_global_norm=clip_plain, cosine_schedule=schedule)
    assert all(c.passed for c in r.checks if c.kind == "invariant"), [c for c in r.checks if not c.passed]
