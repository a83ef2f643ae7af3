"""AdamC: AdamW's update with the decoupled weight decay scaled by lr_t / lr_max."""

from __future__ import annotations

import math

import pytest
import torch

from llm_refine.train.optim import AdamC


def _adam_step(p, g, lr, wd, betas=(0.9, 0.95), eps=1e-8, t=1, m=None, v=None):
    """The formula, written out in float64: decay, then the bias-corrected Adam step."""
    b1, b2 = betas
    m = b1 * (m if m is not None else 0) + (1 - b1) * g
    v = b2 * (v if v is not None else 0) + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    return p * (1 - lr * wd) - lr * mhat / (vhat.sqrt() + eps), m, v


@pytest.mark.parametrize("multiplier", [1.0, 0.5, 0.1])
def test_adamc_update_matches_its_formula(multiplier):
    torch.manual_seed(0)
    p0 = torch.randn(64, dtype=torch.float64)
    grads = [torch.randn(64, dtype=torch.float64) for _ in range(3)]
    lr_max, wd = 0.01, 0.1
    param = torch.nn.Parameter(p0.clone())
    opt = AdamC([param], lr=lr_max, weight_decay=wd, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: multiplier)
    expected, m, v = p0.clone(), None, None
    for t, g in enumerate(grads, 1):
        param.grad = g.clone()
        opt.step()
        lr_t = lr_max * multiplier
        expected, m, v = _adam_step(expected, g, lr_t, wd * lr_t / lr_max, t=t, m=m, v=v)
        sched.step()
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)


def test_adamc_at_peak_lr_is_adamw_bit_for_bit():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(32))
    b = torch.nn.Parameter(a.detach().clone())
    oa = torch.optim.AdamW([a], lr=3e-3, weight_decay=0.1)
    ob = AdamC([b], lr=3e-3, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(32)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


def test_adamc_decay_shrinks_with_the_schedule():
    """With zero gradients only the decay acts: after one step p = p0 (1 - lr_t^2/lr_max wd)."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = AdamC([p], lr=0.1, weight_decay=0.5)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.2)
    p.grad = torch.zeros_like(p)
    opt.step()
    lr_t = 0.02
    assert p[0].item() == pytest.approx(1 - lr_t * (0.5 * lr_t / 0.1), rel=1e-12)
    assert not math.isclose(p[0].item(), 1 - lr_t * 0.5)  # AdamW would decay 5x more


def test_pretraining_with_adamc_uses_it(tmp_path):
    """``train.optimizer: adamc`` reaches the Trainer: the optimizer that steps is AdamC, its
    decay groups keep the Trainer's split (no decay on norms and biases), and the decay applied at
    the last step is scaled by that step's LR over the peak."""
    from transformers import TrainerCallback

    from _pretrain_common import tiny_overrides
    from llm_refine.train.config import load_pretrain_config
    from llm_refine.train.pretrain import run_pretrain

    seen = {"checked": 0}

    def groups(optimizer):
        return getattr(optimizer, "optimizer", optimizer).param_groups

    class Spy(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            seen["lr"] = [g["lr"] for g in groups(optimizer)]

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            seen["cls"] = type(getattr(optimizer, "optimizer", optimizer))
            for g, lr_used in zip(groups(optimizer), seen["lr"]):
                assert g["max_lr"] == pytest.approx(0.003)
                assert g["weight_decay"] == pytest.approx(g["corrected_weight_decay"] * lr_used / g["max_lr"], rel=1e-12)
                seen["checked"] += 1
            seen["decays"] = sorted(g["corrected_weight_decay"] for g in groups(optimizer))

    cfg = load_pretrain_config(None, tiny_overrides(tmp_path, "train.optimizer=adamc", "train.weight_decay=0.1", steps=10))
    run_pretrain(cfg, callbacks=[Spy()])
    assert seen["cls"] is AdamC and seen["checked"] >= 10
    assert seen["decays"][0] == 0.0 and seen["decays"][-1] == 0.1  # the Trainer's no-decay group kept
