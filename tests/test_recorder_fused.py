"""The one-pass compiled gradient sums (llm_refine.recorder.fused) against the two-pass fallback:
many shapes and dtypes (incl. empty and non-contiguous tensors), the switches that force the
fallback, and a compile failure that falls back instead of failing the step."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from llm_refine.recorder import fused
from llm_refine.recorder.backends import LocalBackend, sums_of
from llm_refine.recorder.backends.base import sums_two_pass
from llm_refine.recorder.core import GradNormRecorder


def _ref64(ts):
    l1 = sum(float(t.double().abs().sum()) for t in ts)
    l2sq = sum(float((t.double() ** 2).sum()) for t in ts)
    return l1, l2sq


def _mixed_tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(300, 257, generator=g)
    ts = [
        torch.randn(3, 5, generator=g),
        torch.randn(1, generator=g),
        torch.randn(7, generator=g) * 1e3,
        torch.empty(0, 4),  # empty
        big.t(),  # non-contiguous (transposed)
        big[::3, 1::2],  # non-contiguous (strided slice)
        torch.randn(4, 6, 2, 3, generator=g).permute(3, 1, 0, 2),  # non-contiguous 4-d
        torch.randn(2, 1, 9, generator=g).expand(2, 4, 9),  # zero stride
        torch.randn(100_003, generator=g),  # odd length: the vector loop's tail
        torch.zeros(17),
    ]
    return [t.to(dtype) for t in ts]


@pytest.fixture
def fresh_cache(monkeypatch):
    """A private FusedSums cache, so a test sees its own compiles and failures."""
    cache = fused.FusedSums()
    monkeypatch.setattr(fused, "FUSED", cache)
    monkeypatch.delenv(fused.ENV, raising=False)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_equals_fallback_many_shapes_and_dtypes(fresh_cache, dtype):
    ts = _mixed_tensors(dtype)
    f = sums_of(ts, fused=True)
    assert fresh_cache.compiled() == 1 and fresh_cache.calls == 1 and not fresh_cache.failures
    b = sums_two_pass(ts)
    assert f.dtype == b.dtype == torch.float64 and f.shape == b.shape == (2,)
    torch.testing.assert_close(f, b, rtol=2e-6, atol=0.0)
    # float32 accumulation of the (bf16/fp16) values themselves: close to the float64 reference
    l1, l2sq = _ref64(ts)
    assert math.isclose(f[0].item(), l1, rel_tol=2e-6) and math.isclose(f[1].item(), l2sq, rel_tol=2e-6)
    # same signature again: no recompile, same result
    again = sums_of(ts, fused=True)
    assert fresh_cache.compiled() == 1 and fresh_cache.calls == 2 and torch.equal(again, f)


def test_fused_one_graph_per_gradient_list_and_per_dtype_bucket(fresh_cache):
    ts = [torch.randn(64, 33), torch.randn(5), torch.randn(33, 64).t()]
    first = sums_of(ts, fused=True)
    ts2 = [torch.randn(64, 33), torch.randn(5), torch.randn(33, 64).t()]  # new values, same layout
    second = sums_of(ts2, fused=True)
    assert fresh_cache.compiled() == 1 and len(fresh_cache.compile_s) == 1 and fresh_cache.calls == 2
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, sums_two_pass(ts2), rtol=2e-6, atol=0.0)
    mixed = ts + [torch.randn(9, 9).bfloat16()]  # two dtype buckets: the float32 one is cached
    f = sums_of(mixed, fused=True)
    assert fresh_cache.compiled() == 2
    torch.testing.assert_close(f, sums_two_pass(mixed), rtol=2e-6, atol=0.0)
    assert fresh_cache.total_compile_s() > 0 and fresh_cache.total_compile_cpu_s() > 0


def test_fused_handles_nonfinite_like_the_fallback(fresh_cache):
    ts = [torch.randn(64, 64), torch.randn(33)]
    sums_of(ts, fused=True)  # compile + check on finite values
    ts[1][3] = float("inf")
    f, b = sums_of(ts, fused=True), sums_two_pass(ts)
    assert torch.isinf(f).all() and torch.isinf(b).all()
    ts[1][4] = float("nan")
    assert torch.isnan(sums_of(ts, fused=True)).all() and torch.isnan(sums_two_pass(ts)).all()


def test_auto_mode_threshold_and_what_never_goes_fused(fresh_cache):
    small = [torch.randn(10, 10)]
    sums_of(small)  # auto: below MIN_NUMEL -> fallback, nothing compiled
    assert fresh_cache.compiled() == 0 and fresh_cache.calls == 0
    f64 = [torch.randn(fused.MIN_NUMEL + 1, dtype=torch.float64)]
    out = sums_of(f64, fused=True)  # float64 grads: the fallback, float64 sums
    assert fresh_cache.compiled() == 0
    l1, l2sq = _ref64(f64)
    assert math.isclose(out[0].item(), l1, rel_tol=1e-12) and math.isclose(out[1].item(), l2sq, rel_tol=1e-12)
    assert fused.applicable([torch.randn(fused.MIN_NUMEL)], None)
    assert not fused.applicable([torch.randn(fused.MIN_NUMEL - 1)], None)
    assert fused.applicable([torch.randn(3)], True) and not fused.applicable([torch.randn(10**6)], False)
    assert sums_of([], fused=True).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("value", ["0", "off", "false", "no"])
def test_env_switch_forces_the_fallback(fresh_cache, monkeypatch, value):
    monkeypatch.setenv(fused.ENV, value)
    ts = [torch.randn(fused.MIN_NUMEL + 5)]
    sums_of(ts)
    assert fresh_cache.compiled() == 0 and fresh_cache.calls == 0
    assert fused.resolve(None) is False and fused.resolve(True) is True  # explicit wins
    monkeypatch.setenv(fused.ENV, "1")
    assert fused.resolve(None) is True


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(400, 400)
        self.b = nn.Linear(400, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _grads(model, seed=0):
    torch.manual_seed(seed)
    model.zero_grad()
    model(torch.randn(8, 400)).pow(2).mean().backward()


def test_recorder_constructor_switch(fresh_cache, tmp_path):
    m = Wide()  # 161K parameters: above MIN_NUMEL, so auto mode compiles
    _grads(m)
    off = GradNormRecorder(LocalBackend(m), None, fused=False)
    s_off = off.capture(0)
    assert off.backend.fused is False and fresh_cache.compiled() == 0
    auto = GradNormRecorder(LocalBackend(m), None)
    s_auto = auto.capture(0)
    assert auto.backend.fused is None and fresh_cache.compiled() == 1
    torch.testing.assert_close(s_auto, s_off, rtol=2e-6, atol=0.0)
    l1 = sum(float(p.grad.double().abs().sum()) for p in m.parameters())
    assert math.isclose(s_auto[0].item(), l1, rel_tol=1e-6)


def test_compile_failure_falls_back_and_is_logged(monkeypatch, caplog):
    def broken(fn):
        def call(grads):
            raise RuntimeError("no C++ compiler (simulated)")
        return call

    cache = fused.FusedSums(compile_fn=broken)
    monkeypatch.setattr(fused, "FUSED", cache)
    ts = [torch.randn(50, 50), torch.randn(7)]
    with caplog.at_level(logging.DEBUG, logger="llm_refine.recorder.fused"):
        out = sums_of(ts, fused=True)
    torch.testing.assert_close(out, sums_two_pass(ts), rtol=0, atol=0)
    assert cache.compiled() == 0 and cache.fallbacks == 1
    assert any("no C++ compiler" in r.getMessage() for r in caplog.records)
    (reason,) = cache.failures.values()
    assert "RuntimeError" in reason
    # detected once: the signature is not retried, the fallback answers directly
    assert torch.equal(sums_of(ts, fused=True), out) and cache.fallbacks == 2


def test_wrong_kernel_is_rejected_by_the_first_call_check(monkeypatch):
    def wrong(fn):
        return lambda grads: fn(grads) * 1.01

    cache = fused.FusedSums(compile_fn=wrong)
    monkeypatch.setattr(fused, "FUSED", cache)
    ts = [torch.randn(40, 40)]
    torch.testing.assert_close(sums_of(ts, fused=True), sums_two_pass(ts), rtol=0, atol=0)
    assert cache.compiled() == 0 and "disagree" in next(iter(cache.failures.values()))


def test_signature_cap(monkeypatch):
    cache = fused.FusedSums(compile_fn=lambda fn: fn)  # eager "compile": tests the bookkeeping only
    monkeypatch.setattr(fused, "FUSED", cache)
    monkeypatch.setattr(fused, "MAX_SIGNATURES", 2)
    for n in (3, 4, 5):
        ts = [torch.randn(n)]
        torch.testing.assert_close(sums_of(ts, fused=True), sums_two_pass(ts))
    assert cache.compiled() == 2 and len(cache.failures) == 1


def test_fused_sums_do_not_touch_the_gradients(fresh_cache):
    m = Wide()
    _grads(m)
    before = [p.grad.clone() for p in m.parameters()]
    ptrs = [p.grad.data_ptr() for p in m.parameters()]
    sums_of([p.grad for p in m.parameters()], fused=True)
    sums_of([p.grad for p in m.parameters()], fused=True)
    assert fresh_cache.compiled() == 1
    assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters()))
    assert ptrs == [p.grad.data_ptr() for p in m.parameters()]
