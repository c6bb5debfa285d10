"""Sophia's Gauss-Newton-Bartlett (GNB) Hessian estimator: mupopt.gnb_backward and
SophiaG.update_hessian_from_logits against a hand-written sampled-label backward, and a full
training loop against the official sophia_opt.SophiaG fed the same GNB gradients.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mupopt

from models import MLP, TinyGPT, token_batch

VOCAB = 37
HP = dict(lr=1e-2, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)


def manual_gnb(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sophia Algorithm 2 written out: labels ~ softmax(logits), mean CE against them, backward."""
    flat = logits.reshape(-1, logits.shape[-1])
    probs = F.softmax(flat.detach().float(), dim=-1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    loss = F.cross_entropy(flat, labels)
    loss.backward()
    return loss.detach()


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def lm_batch(seed=0):
    ids = token_batch(batch=4, seq=9, vocab=VOCAB, seed=seed)
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_gnb_backward_equals_manual_sampled_label_backward(kind):
    """gnb_backward with a seeded generator leaves the gradients, returns the loss and consumes
    the generator exactly like the hand-written estimator."""
    torch.manual_seed(0)
    model = TinyGPT(32) if kind == "lm" else MLP(16, d_out=5)
    twin = copy.deepcopy(model)
    x = lm_batch()[0] if kind == "lm" else torch.randn(12, 10)
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    loss = mupopt.gnb_backward(model(x), generator=gen_a)
    expected = manual_gnb(twin(x), gen_b)
    assert not loss.requires_grad
    assert torch.equal(loss, expected)
    got, want = grads_of(model), grads_of(twin)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert torch.equal(torch.rand(3, generator=gen_a), torch.rand(3, generator=gen_b))

    # The labels are sampled (not fixed): another seed gives another gradient.
    other = copy.deepcopy(twin)
    other.zero_grad()
    mupopt.gnb_backward(other(x), generator=torch.Generator().manual_seed(8))
    assert any(not torch.equal(p.grad, want[n]) for n, p in other.named_parameters())


def test_update_hessian_from_logits_is_the_ema_of_squared_gnb_grads():
    """update_hessian_from_logits: clears stale grads first, h = b2*h + (1-b2)*g^2 from the GNB
    gradient (two updates, so the EMA's b2*h term is exercised), leaves grads cleared and does
    not touch the step count or momentum."""
    torch.manual_seed(0)
    model = TinyGPT(32)
    twin = copy.deepcopy(model)
    opt = mupopt.SophiaG(model.parameters(), **HP)
    b2 = HP["betas"][1]
    x, _ = lm_batch()
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    h = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in twin.named_parameters()}
    for round_ in range(2):
        for p in model.parameters():  # stale gradients must not leak into the estimate
            p.grad = torch.full_like(p, 5.0)
        loss = opt.update_hessian_from_logits(model(x), generator=gen_a)
        twin.zero_grad(set_to_none=True)
        expected_loss = manual_gnb(twin(x), gen_b)
        assert torch.equal(loss, expected_loss)
        assert all(p.grad is None for p in model.parameters())
        for (n, q) in twin.named_parameters():
            g = q.grad.double()
            h[n] = b2 * h[n] + (1 - b2) * g * g
        for (n, p) in model.named_parameters():
            st = opt.state[p]
            torch.testing.assert_close(st["hessian"].double(), h[n], rtol=1e-6, atol=1e-12, msg=f"{n} round {round_}")
            assert st["step"].item() == 0
            assert torch.count_nonzero(st["exp_avg"]) == 0
    assert any(torch.count_nonzero(v) > 0 for v in h.values())


def test_training_loop_matches_official_sophia():
    """A tiny LM trained 12 steps with mupopt.SophiaG (GNB through update_hessian_from_logits
    every 3 steps) follows sophia_opt.SophiaG fed the hand-written GNB gradients. rho = 10 so
    that the Hessian actually bounds part of the update (at rho = 0.04 and this scale nearly
    every coordinate is clipped to sign(m), and the Hessian would not matter)."""
    sophia_opt = pytest.importorskip("sophia_opt")
    torch.manual_seed(0)
    ours_model = TinyGPT(32)
    ref_model = copy.deepcopy(ours_model)
    hp = dict(HP, rho=10.0)
    ours = mupopt.SophiaG(ours_model.parameters(), **hp)
    ref = sophia_opt.SophiaG(ref_model.parameters(), **hp)
    gen_a, gen_b = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    k = 3
    b1 = hp["betas"][0]
    losses, unclipped = [], []
    for it in range(12):
        x, y = lm_batch(seed=it % 4)
        bs = x.numel()
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            if model is ours_model and it > k:  # share of coordinates the Hessian bounds
                ratios = [
                    ((b1 * opt.state[p]["exp_avg"] + (1 - b1) * p.grad).abs() / (hp["rho"] * bs * opt.state[p]["hessian"] + 1e-15)).flatten()
                    for p in model.parameters()
                ]
                ratios = torch.cat(ratios)
                unclipped.append(((ratios < 1) & (ratios > 0)).float().mean().item())
            opt.step(bs=bs)
            opt.zero_grad(set_to_none=True)
            if model is ours_model:
                losses.append(loss.item())
        if it % k == k - 1:
            ours.update_hessian_from_logits(ours_model(x), generator=gen_a)
            ref.zero_grad(set_to_none=True)
            manual_gnb(ref_model(x), gen_b)
            ref.update_hessian()
            ref.zero_grad(set_to_none=True)
        for (n, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"{n} after step {it}")
    for p, q in zip(ours.param_groups[0]["params"], ref.param_groups[0]["params"]):
        torch.testing.assert_close(ours.state[p]["hessian"], ref.state[q]["hessian"], rtol=1e-6, atol=1e-10)
    assert any(torch.count_nonzero(ours.state[p]["hessian"]) > 0 for p in ours_model.parameters())
    assert losses[-1] < losses[0]  # it did train
    assert max(unclipped) > 0.05, unclipped  # and the Hessian shaped the steps


def test_step_without_bs_uses_5120_and_warns_once_per_optimizer():
    """sophia-opt's default bs=5120 is kept, but the clip threshold depends on the real tokens
    per batch: step() without bs warns, once per optimizer; step(bs=...) never warns."""
    import warnings

    def trained(bs_kwargs, steps=3):
        torch.manual_seed(0)
        model = MLP(16)
        opt = mupopt.SophiaG(model.parameters(), lr=1e-2, rho=0.04)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(steps):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
                opt.step(**bs_kwargs)
                if t == 0:  # a Hessian estimate, so that bs matters (rho*bs*h)
                    opt.update_hessian()
        return [p.detach() for p in model.parameters()], [w for w in caught if "bs=" in str(w.message)]

    default, warned = trained({})
    explicit, silent = trained({"bs": 5120})
    other, _ = trained({"bs": 8})
    assert len(warned) == 1 and "tokens per batch" in str(warned[0].message)
    # It names the caller's line (here, this file), not torch's no_grad wrapper of step(): at
    # torch's line every SophiaG of a process shared one location, which Python's default
    # filter shows once per process, not once per optimizer.
    assert warned[0].filename == __file__, warned[0].filename
    assert not silent
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))
    assert not all(torch.equal(a, b) for a, b in zip(default, other))
    _, again = trained({}, steps=1)  # a new optimizer warns again
    assert len(again) == 1
