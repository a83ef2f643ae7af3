"""One-pass [Σ|g|, Σg²] over a list of CPU gradients: one small compiled C++ loop, built once.

The eager path (``backends.base.sums_of``'s fallback) reads every gradient twice on CPU —
``abs().sum()`` for ℓ1 and ``_foreach_norm(…, 2)`` for ℓ2 — and pays a few operator dispatches per
tensor. Here one C++ function (:data:`SOURCE`) walks every gradient of a (dtype) bucket once, each
element loaded once and fed to both accumulators, and is called ONCE per bucket with the
gradients' data pointers and sizes: no per-tensor dispatch, and no shapes in the compiled code, so
it is built once per process (and cached on disk by inductor's C++ code cache, keyed by the
source), never recompiled for a new parameter shape, a new model or a parameter group.

Accumulation: float32 within blocks of 4096 consecutive elements (16 independent lanes, which the
compiler vectorises; bf16/fp16 values are widened to float32 one by one, never summed in half
precision), float64 across blocks and across tensors — at least as exact as the fallback (float32
per tensor, float64 across tensors). Only contiguous CPU float32/bf16/fp16 tensors go through the
kernel; any other tensor of the bucket (non-contiguous views) is summed by the fallback and added.

Built with ``torch._inductor.codecache.CppPythonBindingsCodeCache`` (the machinery inductor uses
for its own CPU kernels: the host C++ compiler and torch's headers, no ninja, no Python headers of
a full extension). Never crashes training: the build is tried once per process; a failure (no
compiler, an internal API that moved) or a kernel that fails its self-test against float64 on
fixed data disables it (logged at debug) and the caller uses the fallback.
``LLM_REFINE_FUSED_NORMS=0`` (or ``off``/``false``/``no``) forces the fallback;
``GradNormRecorder(fused=False)`` does so for one recorder. The build time is in
:attr:`FusedSums.compile_s`, so a benchmark reports it apart from per-step cost.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

ENV = "LLM_REFINE_FUSED_NORMS"
#: dtypes the kernel reads (code passed to it), all accumulated in float32 blocks.
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: Self-test tolerance against float64 (the kernel's float32 blocks are within ~1e-7 on the
#: self-test's data; anything beyond this is a wrong kernel).
CHECK_RTOL = 1e-5

_OFF = ("0", "off", "false", "no")
_ON = ("1", "on", "true", "yes", "force")

ARGTYPES = ("const int64_t*", "const int64_t*", "double*", "int64_t", "int64_t")
SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// llm-refine recorder: [sum |x|, sum x^2] of n contiguous arrays in one pass (v1)
template <typename T>
static inline void llmr_sums_one(const T* __restrict__ x, int64_t n, double& s1, double& s2) {
  constexpr int64_t B = 4096;  // float32 block, then float64
  constexpr int L = 16;        // independent lanes: vectorised by the compiler
  for (int64_t b = 0; b < n; b += B) {
    const int64_t e = std::min(n, b + B);
    float a1[L] = {0.f}, a2[L] = {0.f};
    int64_t i = b;
    for (; i + L <= e; i += L) {
      for (int k = 0; k < L; ++k) {
        const float v = static_cast<float>(x[i + k]);
        a1[k] += std::fabs(v);
        a2[k] += v * v;
      }
    }
    float t1 = 0.f, t2 = 0.f;
    for (; i < e; ++i) {
      const float v = static_cast<float>(x[i]);
      t1 += std::fabs(v);
      t2 += v * v;
    }
    for (int k = 0; k < L; ++k) {
      t1 += a1[k];
      t2 += a2[k];
    }
    s1 += static_cast<double>(t1);
    s2 += static_cast<double>(t2);
  }
}

extern "C" void kernel(const int64_t* ptrs, const int64_t* numels, double* out, int64_t n, int64_t dtype) {
  double s1 = 0.0, s2 = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const void* p = reinterpret_cast<const void*>(ptrs[t]);
    if (dtype == 0) {
      llmr_sums_one(static_cast<const float*>(p), numels[t], s1, s2);
    } else if (dtype == 1) {
      llmr_sums_one(static_cast<const c10::BFloat16*>(p), numels[t], s1, s2);
    } else {
      llmr_sums_one(static_cast<const c10::Half*>(p), numels[t], s1, s2);
    }
  }
  out[0] = s1;
  out[1] = s2;
}
"""


def env_mode() -> bool | None:
    """``LLM_REFINE_FUSED_NORMS``: False (force the fallback), True (on), None (unset: on)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in _OFF:
        return False
    if v in _ON:
        return True
    return None


def resolve(fused: bool | None) -> bool | None:
    """The effective mode: an explicit ``fused`` wins, else the environment, else None (on)."""
    return env_mode() if fused is None else bool(fused)


def applicable(grads: Sequence[torch.Tensor], mode: bool | None) -> bool:
    """Whether a (device, dtype) bucket of non-empty tensors goes through the kernel."""
    if mode is False or not grads:
        return False
    g0 = grads[0]
    return g0.device.type == "cpu" and g0.dtype in DTYPES


class _Args:
    """The kernel's pointer and size arrays of the last bucket, rebuilt only when a tensor's address
    or size changed (the caching allocator usually hands a parameter's gradient the same memory
    every step, and building two small tensors costs a fifth of the kernel on a small model)."""

    def __init__(self):
        self.key: tuple[list[int], list[int]] | None = None
        self.ptrs: torch.Tensor | None = None
        self.numels: torch.Tensor | None = None

    def get(self, dense: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        key = ([g.data_ptr() for g in dense], [g.numel() for g in dense])
        if key != self.key:
            self.ptrs = torch.tensor(key[0], dtype=torch.int64)
            self.numels = torch.tensor(key[1], dtype=torch.int64)
            self.key = key
        return self.ptrs, self.numels


def _run(kernel: Callable, dense: Sequence[torch.Tensor], out: torch.Tensor, args: _Args | None = None) -> None:
    """``out`` (2,) float64 = the sums of contiguous CPU tensors of one dtype (``dense`` holds them
    alive for the call: the arrays are only their addresses)."""
    ptrs, numels = (args or _Args()).get(dense)
    kernel(ptrs, numels, out, len(dense), DTYPES[dense[0].dtype])


def _self_test(kernel: Callable) -> None:
    """Run a freshly built kernel on fixed data (block and lane edges, every dtype) against a
    float64 reference; raise if it is wrong. Not checked against the float32 fallback: on large
    tensors torch's float32 norm is the less exact of the two (measured: 1.5e-4 relative on a
    4M-element tensor, where this kernel is within 1e-9)."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(n, generator=gen) * s for n, s in
            ((1, 1.0), (15, 3.0), (16, 1e-3), (17, 1.0), (4095, 0.5), (4096, 2.0), (4097, 1e2), (10_000, 1.0))]
    for dtype in DTYPES:
        ts = [t.to(dtype) for t in base]
        out = torch.zeros(2, dtype=torch.float64)
        _run(kernel, ts, out)
        ref = torch.tensor([sum(float(t.double().abs().sum()) for t in ts),
                            sum(float((t.double() ** 2).sum()) for t in ts)], dtype=torch.float64)
        if not torch.allclose(out, ref, rtol=CHECK_RTOL, atol=0.0):
            raise RuntimeError(f"self-test failed for {dtype}: kernel {out.tolist()} vs float64 {ref.tolist()}")


def _build(argtypes: Sequence[str], source: str) -> Callable:
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    return CppPythonBindingsCodeCache.load_pybinding(list(argtypes), source)


class FusedSums:
    """The process's kernel (built at first use) and its bookkeeping. ``loader(argtypes, source)``
    replaces the builder (tests inject a failing or a wrong one)."""

    def __init__(self, loader: Callable | None = None):
        self._loader = loader or _build
        self._kernel: Callable | None | bool = False  # False: not tried yet; None: unavailable
        self.compile_s = 0.0  # wall seconds of the build (or disk-cache load)
        self.compile_cpu_s = 0.0  # this process's CPU seconds of it (the compiler runs apart)
        self.failures: dict[str, str] = {}
        self.calls = 0  # bucket sums answered by the kernel
        self.fallbacks = 0  # buckets handed back to the fallback (kernel unavailable)
        self._args = _Args()

    def available(self) -> bool:
        return callable(self._kernel)

    def _get(self) -> Callable | None:
        if self._kernel is False:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                kernel = self._loader(ARGTYPES, SOURCE)
                _self_test(kernel)
                self._kernel = kernel
            except Exception as e:  # noqa: BLE001 - no kernel means: the fallback, never a crash
                self._fail("build" if "self-test" not in str(e) else "self-test", e)
                self._kernel = None
            self.compile_s = time.perf_counter() - t0
            self.compile_cpu_s = time.process_time() - c0
            if self._kernel is not None:
                log.debug("fused grad sums: kernel ready in %.2f s (%.2f s CPU in this process)",
                          self.compile_s, self.compile_cpu_s)
        return self._kernel or None

    def _fail(self, what: str, e: BaseException | str) -> None:
        msg = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
        self.failures[what] = msg.splitlines()[0][:500] if msg else what
        log.debug("fused grad sums unavailable (%s: %s); using the two-pass fallback", what, self.failures[what])

    def __call__(self, grads: Sequence[torch.Tensor], fallback: Callable[[list], torch.Tensor]) -> torch.Tensor | None:
        """(2,) float64 [Σ|g|, Σg²] of one (CPU, dtype) bucket of non-empty tensors, or None when
        the kernel is unavailable. ``fallback(tensors)`` sums a list with the two-pass path (used for
        the bucket's non-contiguous tensors)."""
        kernel = self._get()
        if kernel is None:
            self.fallbacks += 1
            return None
        if all(g.is_contiguous() for g in grads):
            dense, rest = grads, []
        else:
            dense = [g for g in grads if g.is_contiguous()]
            rest = [g for g in grads if not g.is_contiguous()]
        out = torch.zeros(2, dtype=torch.float64)
        if dense:
            _run(kernel, dense, out, self._args)
        if rest:
            out += fallback(rest).to(torch.float64)
        self.calls += 1
        return out

    def clear(self) -> None:
        """Forget the kernel (the next call builds or loads it again) and the counters."""
        self._kernel = False
        self.failures.clear()
        self.compile_s = self.compile_cpu_s = 0.0
        self.calls = self.fallbacks = 0
        self._args = _Args()


#: The process-wide instance used by ``sums_of``.
FUSED = FusedSums()
