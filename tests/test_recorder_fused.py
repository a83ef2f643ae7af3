"""The one-pass compiled gradient sums (llm_refine.recorder.fused) against the two-pass fallback:
many shapes and dtypes (incl. empty and non-contiguous tensors), the switches that force the
fallback, and a build failure or a wrong kernel that falls back instead of failing the step."""

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
    """A private FusedSums (its own build, check and counters); the real C++ kernel."""
    cache = fused.FusedSums()
    monkeypatch.setattr(fused, "FUSED", cache)
    monkeypatch.delenv(fused.ENV, raising=False)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_equals_fallback_many_shapes_and_dtypes(fresh_cache, dtype):
    ts = _mixed_tensors(dtype)
    f = sums_of(ts, fused=True)
    assert fresh_cache.available() and fresh_cache.calls == 1 and not fresh_cache.failures
    b = sums_two_pass(ts)
    assert f.dtype == b.dtype == torch.float64 and f.shape == b.shape == (2,)
    torch.testing.assert_close(f, b, rtol=2e-6, atol=0.0)
    # float32 accumulation of the (bf16/fp16) values themselves: close to the float64 reference
    l1, l2sq = _ref64(ts)
    assert math.isclose(f[0].item(), l1, rel_tol=2e-6) and math.isclose(f[1].item(), l2sq, rel_tol=2e-6)
    again = sums_of(ts, fused=True)
    assert fresh_cache.calls == 2 and torch.equal(again, f)


def test_contiguous_only_lists_are_one_kernel_call(fresh_cache):
    ts = [torch.randn(64, 33), torch.randn(5), torch.randn(1, 7, 1), torch.randn(100_003)]
    calls = []
    real = fresh_cache._get()

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    fresh_cache._kernel = spy
    f = sums_of(ts, fused=True)
    assert calls == [4]  # one call for the whole bucket, every tensor in it
    l1, l2sq = _ref64(ts)
    assert math.isclose(f[0].item(), l1, rel_tol=1e-7) and math.isclose(f[1].item(), l2sq, rel_tol=1e-7)


def test_one_build_for_every_shape_and_list(fresh_cache):
    for n in (3, 1000, 4097, 65_536 + 5):
        ts = [torch.randn(n), torch.randn(n % 17 + 1, 3)]
        torch.testing.assert_close(sums_of(ts, fused=True), sums_two_pass(ts), rtol=2e-6, atol=0.0)
    mixed = [torch.randn(9, 9), torch.randn(9, 9).bfloat16(), torch.randn(4).half()]
    torch.testing.assert_close(sums_of(mixed, fused=True), sums_two_pass(mixed), rtol=2e-6, atol=0.0)
    assert fresh_cache.calls == 4 + 3 and fresh_cache.compile_s > 0 and not fresh_cache.failures


def test_fused_is_at_least_as_exact_as_the_fallback_on_a_large_tensor(fresh_cache):
    g = torch.randn(4_000_000, generator=torch.Generator().manual_seed(3)) * 1e-3
    l1, l2sq = _ref64([g])
    f, b = sums_of([g], fused=True), sums_two_pass([g])
    err_f = max(abs(f[0].item() - l1) / l1, abs(f[1].item() - l2sq) / l2sq)
    err_b = max(abs(b[0].item() - l1) / l1, abs(b[1].item() - l2sq) / l2sq)
    assert err_f < 1e-6 and err_f <= err_b + 1e-7, (err_f, err_b)


def test_fused_handles_nonfinite_like_the_fallback(fresh_cache):
    ts = [torch.randn(64, 64), torch.randn(33)]
    sums_of(ts, fused=True)  # build + check on finite values
    ts[1][3] = float("inf")
    f, b = sums_of(ts, fused=True), sums_two_pass(ts)
    assert torch.isinf(f).all() and torch.isinf(b).all()
    ts[1][4] = float("nan")
    assert torch.isnan(sums_of(ts, fused=True)).all() and torch.isnan(sums_two_pass(ts)).all()


def test_what_never_goes_through_the_kernel(fresh_cache):
    f64 = [torch.randn(1000, dtype=torch.float64)]
    out = sums_of(f64, fused=True)  # float64 grads: the fallback, float64 sums
    assert fresh_cache.calls == 0
    l1, l2sq = _ref64(f64)
    assert math.isclose(out[0].item(), l1, rel_tol=1e-12) and math.isclose(out[1].item(), l2sq, rel_tol=1e-12)
    assert fused.applicable([torch.randn(3)], None) and fused.applicable([torch.randn(3)], True)
    assert not fused.applicable([torch.randn(3)], False)
    assert not fused.applicable([torch.randn(3, dtype=torch.float64)], True)
    assert not fused.applicable([torch.randn(3, device="meta")], True)
    assert sums_of([], fused=True).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("value", ["0", "off", "false", "no"])
def test_env_switch_forces_the_fallback(fresh_cache, monkeypatch, value):
    monkeypatch.setenv(fused.ENV, value)
    sums_of([torch.randn(1000)])
    assert fresh_cache.calls == 0 and not fresh_cache.available()  # never even built
    assert fused.resolve(None) is False and fused.resolve(True) is True  # explicit wins
    monkeypatch.setenv(fused.ENV, "1")
    assert fused.resolve(None) is True


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(40, 40)
        self.b = nn.Linear(40, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _grads(model, seed=0):
    torch.manual_seed(seed)
    model.zero_grad()
    model(torch.randn(8, 40)).pow(2).mean().backward()


def test_recorder_constructor_switch(fresh_cache):
    m = Wide()
    _grads(m)
    off = GradNormRecorder(LocalBackend(m), None, fused=False)
    s_off = off.capture(0)
    assert off.backend.fused is False and fresh_cache.calls == 0
    auto = GradNormRecorder(LocalBackend(m), None)
    s_auto = auto.capture(0)
    assert auto.backend.fused is None and fresh_cache.calls == 1
    torch.testing.assert_close(s_auto, s_off, rtol=2e-6, atol=0.0)
    l1 = sum(float(p.grad.double().abs().sum()) for p in m.parameters())
    assert math.isclose(s_auto[0].item(), l1, rel_tol=1e-6)
    groups = GradNormRecorder(LocalBackend(m), None, param_groups=[[m.a.weight], [m.a.bias, m.b.weight, m.b.bias]])
    row = groups.capture(0)
    torch.testing.assert_close(row[2:4] + row[4:6], row[:2], rtol=1e-12, atol=0.0)


def test_build_failure_falls_back_and_is_logged(monkeypatch, caplog):
    tries = []

    def broken(argtypes, source):
        tries.append(1)
        raise RuntimeError("no C++ compiler (simulated)")

    cache = fused.FusedSums(loader=broken)
    monkeypatch.setattr(fused, "FUSED", cache)
    monkeypatch.delenv(fused.ENV, raising=False)
    ts = [torch.randn(50, 50), torch.randn(7)]
    with caplog.at_level(logging.DEBUG, logger="llm_refine.recorder.fused"):
        out = sums_of(ts)
    torch.testing.assert_close(out, sums_two_pass(ts), rtol=0, atol=0)
    assert not cache.available() and cache.fallbacks == 1
    assert any("no C++ compiler" in r.getMessage() for r in caplog.records)
    assert "RuntimeError" in cache.failures["build"]
    # detected once: not retried, the fallback answers directly
    assert torch.equal(sums_of(ts), out) and cache.fallbacks == 2 and tries == [1]


def test_wrong_kernel_is_rejected_by_the_self_test(monkeypatch):
    def wrong(argtypes, source):
        real = fused._build(argtypes, source)

        def call(ptrs, numels, out, n, code):
            real(ptrs, numels, out, n, code)
            out.mul_(1.01)
        return call

    cache = fused.FusedSums(loader=wrong)
    monkeypatch.setattr(fused, "FUSED", cache)
    ts = [torch.randn(40, 40)]
    torch.testing.assert_close(sums_of(ts, fused=True), sums_two_pass(ts), rtol=0, atol=0)
    assert not cache.available() and "self-test failed" in cache.failures["self-test"]
    torch.testing.assert_close(sums_of(ts, fused=True), sums_two_pass(ts), rtol=0, atol=0)


def test_fused_sums_do_not_touch_the_gradients(fresh_cache):
    m = Wide()
    _grads(m)
    before = [p.grad.clone() for p in m.parameters()]
    ptrs = [p.grad.data_ptr() for p in m.parameters()]
    sums_of([p.grad for p in m.parameters()], fused=True)
    sums_of([p.grad for p in m.parameters()], fused=True)
    assert fresh_cache.calls == 2
    assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters()))
    assert ptrs == [p.grad.data_ptr() for p in m.parameters()]


def _lane_order_reference(ts):
    """The kernel's arithmetic, written out in numpy: per 4096-element block, 16 float32 lanes
    (lane k sums elements i + k, i in steps of 16), then the block's tail and the lanes in order
    0..15 into one float32 per norm, then float64 across blocks and tensors."""
    import numpy as np

    s1 = s2 = 0.0
    for t in ts:
        x = t.float().contiguous().reshape(-1).numpy()
        for b in range(0, x.size, 4096):
            blk = x[b : b + 4096]
            m = blk.size // 16 * 16
            lanes = blk[:m].reshape(-1, 16)
            a1 = np.cumsum(np.abs(lanes), axis=0, dtype=np.float32)[-1] if m else np.zeros(16, np.float32)
            a2 = np.cumsum(lanes * lanes, axis=0, dtype=np.float32)[-1] if m else np.zeros(16, np.float32)
            t1 = t2 = np.float32(0)
            for v in blk[m:]:
                t1, t2 = np.float32(t1 + abs(v)), np.float32(t2 + v * v)
            for k in range(16):
                t1, t2 = np.float32(t1 + a1[k]), np.float32(t2 + a2[k])
            s1 += float(t1)
            s2 += float(t2)
    return s1, s2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_both_builds_give_the_same_bits_as_the_written_out_order(fresh_cache, dtype):
    """The 8-wide AVX2 build and the 4-wide build (where this CPU has AVX2, the test compares two
    real builds) sum in one order: the same bits as each other and as a numpy transcription."""
    g = torch.Generator().manual_seed(3)
    ts = [(torch.randn(n, generator=g) * s).to(dtype) for n, s in ((1, 1.0), (15, 2.0), (16, 1.0), (4111, 1e-2), (12_345, 30.0))]
    kernel = fresh_cache._get()
    assert kernel is not None, fresh_cache.failures
    wide, narrow = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    fused._run(kernel, ts, wide)
    fused._run(kernel, ts, narrow, path=fused.PATH_NARROW)
    assert torch.equal(wide, narrow)
    assert tuple(wide.tolist()) == _lane_order_reference(ts)
    import os
    import platform

    cpuinfo = "/proc/cpuinfo"
    if platform.machine() == "x86_64" and os.path.exists(cpuinfo) and " avx2" in open(cpuinfo).read():
        assert fused.uses_avx2(kernel)  # so the comparison above really was of two builds
