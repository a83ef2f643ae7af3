"""One-pass [Σ|g|, Σg²] over a list of CPU gradients: one small compiled C++ loop, built once.

The eager path (``backends.base.sums_of``'s fallback) reads every gradient twice on CPU —
``abs().sum()`` for ℓ1 and ``_foreach_norm(…, 2)`` for ℓ2 — and pays a few operator dispatches per
tensor. Here one C++ function (:data:`SOURCE`) walks every gradient of a (dtype) bucket once, each
element loaded once and fed to both accumulators, and is called ONCE per bucket with the
gradients' data pointers and sizes: no per-tensor dispatch, and no shapes in the compiled code, so
it is built once per process (and cached on disk by inductor's C++ code cache, keyed by the
source), never recompiled for a new parameter shape, a new model or a parameter group.

Accumulation: float32 within blocks of 4096 consecutive elements (16 independent lanes, written
with vector types: 4 x 4-wide on any CPU, 2 x 8-wide AVX2 where the CPU has it, chosen at run time,
the same arithmetic in the same order so the same bits; bf16/fp16 values are widened to float32
one by one, never summed in half precision), float64 across blocks and across tensors — at least as exact as the fallback (float32
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
#include <cstring>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// llm-refine recorder: [sum |x|, sum x^2] of n contiguous arrays in one pass (v2)
//
// 16 float32 lanes per 4096-element block (lane k sums the elements at i + k), then float64:
// written with GCC/clang vector types, so the compiler emits packed instructions whatever flags
// the code cache builds with (the plain-loop v1 compiled to scalar code: ~2 Gelem/s). Two
// builds of the same arithmetic, in the same order, so both give the same bits: 4 x 4-wide
// vectors (any CPU), and 2 x 8-wide under target("avx2"), chosen at run time. No FMA: a*a + acc
// stays two roundings in both.
typedef float llmr_v4f __attribute__((vector_size(16)));
typedef int32_t llmr_v4i __attribute__((vector_size(16)));

template <typename T>
static inline void llmr_tail(const T* x, int64_t i, int64_t e, float& t1, float& t2) {
  for (; i < e; ++i) {
    const float v = static_cast<float>(x[i]);
    t1 += std::fabs(v);
    t2 += v * v;
  }
}

// W lanes from p: float32 loaded as is, bf16/fp16 widened one by one (always inlined, like the body).
template <typename VF, int W, typename T>
__attribute__((always_inline)) static inline VF llmr_load(const T* p) {
  float t[W];
  for (int k = 0; k < W; ++k) t[k] = static_cast<float>(p[k]);
  VF v;
  std::memcpy(&v, t, sizeof v);
  return v;
}
template <typename VF, int W>
__attribute__((always_inline)) static inline VF llmr_load(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One body for both builds: VF/VI the float/int vector types of W lanes, 16 / W vectors per
// norm. Always inlined, so each build compiles it for its own target.
template <typename VF, typename VI, int W, typename T>
__attribute__((always_inline)) static inline void llmr_sums_body(const T* __restrict__ x, int64_t n, double& s1, double& s2) {
  constexpr int64_t B = 4096;
  constexpr int V = 16 / W;
  for (int64_t b = 0; b < n; b += B) {
    const int64_t e = std::min(n, b + B);
    VF a1[V] = {}, a2[V] = {};
    int64_t i = b;
    for (; i + 16 <= e; i += 16) {
      for (int j = 0; j < V; ++j) {
        const VF v = llmr_load<VF, W>(x + i + W * j);
        a1[j] += (VF)((VI)v & 0x7fffffff);
        a2[j] += v * v;
      }
    }
    float t1 = 0.f, t2 = 0.f;
    llmr_tail(x, i, e, t1, t2);
    for (int k = 0; k < 16; ++k) {
      t1 += a1[k / W][k % W];
      t2 += a2[k / W][k % W];
    }
    s1 += static_cast<double>(t1);
    s2 += static_cast<double>(t2);
  }
}

template <typename T>
static void llmr_sums_v4(const T* x, int64_t n, double& s1, double& s2) {
  llmr_sums_body<llmr_v4f, llmr_v4i, 4>(x, n, s1, s2);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LLMR_AVX2 1
typedef float llmr_v8f __attribute__((vector_size(32)));
typedef int32_t llmr_v8i __attribute__((vector_size(32)));

template <typename T>
__attribute__((target("avx2"))) static void llmr_sums_v8(const T* x, int64_t n, double& s1, double& s2) {
  llmr_sums_body<llmr_v8f, llmr_v8i, 8>(x, n, s1, s2);
}
#endif

static bool llmr_wide(int64_t mode) {
#ifdef LLMR_AVX2
  // Asked at the first call, after every constructor (so the CPU model is initialised).
  static const bool avx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return mode != 1 && avx2;
#else
  return false;
#endif
}

template <typename T>
static inline void llmr_sums_one(const T* x, int64_t n, double& s1, double& s2, bool wide) {
#ifdef LLMR_AVX2
  if (wide) {
    llmr_sums_v8(x, n, s1, s2);
    return;
  }
#endif
  llmr_sums_v4(x, n, s1, s2);
}

// dtype: 0 float32, 1 bfloat16, 2 float16; path: 0 the widest this CPU has, 1 the 4-wide build
// (tests compare the two), 2 report in out[0] whether the 8-wide build is used.
extern "C" void kernel(const int64_t* ptrs, const int64_t* numels, double* out, int64_t n, int64_t code) {
  const int64_t dtype = code % 4, path = code / 4;
  const bool wide = llmr_wide(path);
  if (path == 2) {
    out[0] = wide ? 1.0 : 0.0;
    return;
  }
  double s1 = 0.0, s2 = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const void* p = reinterpret_cast<const void*>(ptrs[t]);
    if (dtype == 0) {
      llmr_sums_one(static_cast<const float*>(p), numels[t], s1, s2, wide);
    } else if (dtype == 1) {
      llmr_sums_one(static_cast<const c10::BFloat16*>(p), numels[t], s1, s2, wide);
    } else {
      llmr_sums_one(static_cast<const c10::Half*>(p), numels[t], s1, s2, wide);
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
        return self.of(([g.data_ptr() for g in dense], [g.numel() for g in dense]))

    def of(self, key: tuple[list[int], list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The arrays for (addresses, sizes), rebuilt only when they changed."""
        if key != self.key:
            self.ptrs = torch.tensor(key[0], dtype=torch.int64)
            self.numels = torch.tensor(key[1], dtype=torch.int64)
            self.key = key
        return self.ptrs, self.numels


#: The kernel's ``path`` argument: the widest build this CPU runs (8-wide AVX2 on x86-64 CPUs that
#: have it, else 4-wide), the 4-wide build, or a query of which one the first means.
PATH_WIDEST, PATH_NARROW, PATH_QUERY = 0, 1, 2


def _run(kernel: Callable, dense: Sequence[torch.Tensor], out: torch.Tensor, args: _Args | None = None,
         path: int = PATH_WIDEST) -> None:
    """``out`` (2,) float64 = the sums of contiguous CPU tensors of one dtype (``dense`` holds them
    alive for the call: the arrays are only their addresses)."""
    ptrs, numels = (args or _Args()).get(dense)
    kernel(ptrs, numels, out, len(dense), DTYPES[dense[0].dtype] + 4 * path)


def uses_avx2(kernel: Callable) -> bool:
    """Whether ``kernel`` runs its 8-wide AVX2 build on this CPU (else the 4-wide one)."""
    out = torch.zeros(2, dtype=torch.float64)
    kernel(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), out, 0, 4 * PATH_QUERY)
    return bool(out[0] == 1.0)


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
        narrow = torch.zeros(2, dtype=torch.float64)
        _run(kernel, ts, narrow, path=PATH_NARROW)
        if not torch.equal(out, narrow):  # the same sums in the same order: the same bits on every CPU
            raise RuntimeError(f"self-test failed for {dtype}: 8-wide {out.tolist()} vs 4-wide {narrow.tolist()}")


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

    def one_bucket(self, grads: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """(2,) float64 sums when every tensor of ``grads`` is a contiguous CPU tensor of the first
        one's dtype and the kernel is available, else None (the caller sums them another way).

        The common case of a training step, in one Python loop over the gradients: each tensor's
        checks, address and size are read once (the general path walks the list five times; on a
        small model that Python work costs as much as the kernel)."""
        kernel = self._get()
        if kernel is None or grads[0] is None:
            return None  # the general path counts the fallback
        dt = grads[0].dtype
        if dt not in DTYPES:
            return None
        ptrs: list[int] = []
        numels: list[int] = []
        for g in grads:
            if g is None or g.dtype is not dt or not g.is_cpu or not g.is_contiguous():
                return None
            ptrs.append(g.data_ptr())
            numels.append(g.numel())
        out = torch.zeros(2, dtype=torch.float64)
        p, n = self._args.of((ptrs, numels))
        kernel(p, n, out, len(grads), DTYPES[dt])  # ``grads`` keeps the tensors alive for the call
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
