"""Benchmarks (``llm-refine bench``). Results are ratios measured in one run, never timed asserts.

refine: refine a synthetic 1,000,000-step trace with τ=0.1; time relative to ``numpy.sort`` of a
1,000,000-element float64 array in the same process; peak extra memory (tracemalloc, which sees
numpy's allocations) in units of one float64 array of length T.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np


def synthetic_trace(T: int, seed: int = 0) -> np.ndarray:
    """A RoBERTa-like ℓ1 trace: a fast early drop, a slow decline, multiplicative noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(T, dtype=np.float64) / T
    return (1.0 + 4.0 * np.exp(-t / 0.02)) * (1.0 - 0.6 * t) * rng.lognormal(0.0, 0.2, T)


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_refine(T: int = 1_000_000, tau: float = 0.1, repeats: int = 5) -> dict:
    from .refine import refine_schedule, smooth_norms

    norms = synthetic_trace(T)
    sort_input = np.random.default_rng(1).random(1_000_000)
    refine_schedule(norms[:1000], tau=tau)  # warm imports and code paths
    t_sort = _best_of(lambda: np.sort(sort_input), repeats)
    t_refine = _best_of(lambda: refine_schedule(norms, tau=tau), repeats)
    t_filter = _best_of(lambda: smooth_norms(norms, tau), max(1, repeats // 2))
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    refine_schedule(norms, tau=tau)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "T": T,
        "tau": tau,
        "sort_s": t_sort,
        "refine_s": t_refine,
        "median_filter_s": t_filter,
        "ratio_refine_to_sort": t_refine / t_sort,
        "ratio_filter_to_sort": t_filter / t_sort,
        "ratio_rest_to_sort": (t_refine - t_filter) / t_sort,
        "peak_extra_arrays": (peak - base) / (8 * T),
        "target": "ratio_refine_to_sort <= 5, peak_extra_arrays <= 10",
    }


def add_bench_arguments(p) -> None:
    p.add_argument("what", nargs="?", default="refine", choices=["refine"], help="which benchmark (default: refine)")
    p.add_argument("--steps", type=int, default=1_000_000, help="trace length T (default 1,000,000)")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")


def main_bench(args) -> int:
    r = bench_refine(args.steps, args.tau, args.repeats)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"refine benchmark: T={r['T']:,} steps, tau={r['tau']} (median width {2 * (int(r['tau'] * r['T']) // 2) + 1:,})")
    print(f"  numpy.sort(1M float64)   {r['sort_s'] * 1e3:8.1f} ms  (1.00x)")
    print(f"  refine_schedule          {r['refine_s'] * 1e3:8.1f} ms  ({r['ratio_refine_to_sort']:.2f}x sort)")
    print(f"    of which median filter {r['median_filter_s'] * 1e3:8.1f} ms  ({r['ratio_filter_to_sort']:.2f}x sort)")
    print(f"    the rest               {(r['refine_s'] - r['median_filter_s']) * 1e3:8.1f} ms  ({r['ratio_rest_to_sort']:.2f}x sort)")
    print(f"  peak extra memory        {r['peak_extra_arrays']:.2f} float64 arrays of length T")
    print(f"  target: {r['target']}")
    return 0
