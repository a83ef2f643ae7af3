"""What would it take to refine 1M steps in <= 5x numpy.sort? Times exact running medians at the
benchmark's width (100,001) against numpy's sort, in one run.

Not part of the library or the tests: it backs the README's "Benchmarks" section. It compiles
running_median.cpp with the system C++ compiler when there is one (skipped otherwise) and checks
that its output equals scipy's before timing it.

    python bench/median_alternatives/run.py
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage

from llm_refine.bench import _best_of, synthetic_trace

HERE = Path(__file__).resolve().parent
P = ctypes.c_void_p


def best_ms(fn, repeats=5):
    return _best_of(fn, repeats) * 1e3


def compile_lib(tmp: Path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        return None
    so = tmp / "librunning_median.so"
    subprocess.run([cxx, "-O2", "-march=native", "-shared", "-fPIC", str(HERE / "running_median.cpp"), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.exact_running_median.restype = ctypes.c_int
    lib.exact_running_median.argtypes = [P, P, P, ctypes.c_int64, ctypes.c_int64, P]
    lib.scalar_sort.argtypes = [P, ctypes.c_int64]
    return lib


def rank_walk(lib, x, width):
    order = np.argsort(x)
    ranks = np.empty(x.size, np.int64)
    ranks[order] = np.arange(x.size)
    out = np.empty_like(x)
    rc = lib.exact_running_median(x.ctypes.data, ranks.ctypes.data, order.ctypes.data, x.size, width // 2, out.ctypes.data)
    if rc:
        raise MemoryError("exact_running_median: out of memory")
    return out


def scalar_sort_ms(lib, values, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        work = values.copy()  # sorting is in place; the copy stays out of the timing
        t0 = time.perf_counter()
        lib.scalar_sort(work.ctypes.data, work.size)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> int:
    T, width = 1_000_000, 100_001
    x = np.pad(synthetic_trace(T), (0, width // 2), mode="reflect")  # as refine.smooth_norms pads it
    sort_input = np.random.default_rng(1).random(1_000_000)
    rows = [("numpy.sort (SIMD)", best_ms(lambda: np.sort(sort_input)))]
    rows.append(("scipy.ndimage.median_filter", best_ms(lambda: scipy.ndimage.median_filter(x, size=width, mode="nearest"), 3)))
    with tempfile.TemporaryDirectory() as tmp:
        lib = compile_lib(Path(tmp))
        if lib is None:
            print("no C++ compiler: compiled rows skipped", file=sys.stderr)
        else:
            rng = np.random.default_rng(0)
            for n, w in [(50, 7), (1000, 101), (12345, 1001), (3000, 2999)]:
                for sample in (rng.lognormal(size=n), np.round(rng.lognormal(size=n), 1)):  # with and without ties
                    if not np.array_equal(rank_walk(lib, sample, w), scipy.ndimage.median_filter(sample, size=w, mode="nearest")):
                        raise SystemExit(f"rank walk disagrees with scipy at n={n}, width={w}")
            rows.append(("compiled exact rank walk (incl. argsort)", best_ms(lambda: rank_walk(lib, x, width))))
            rows.append(("  of which numpy.argsort", best_ms(lambda: np.argsort(x))))
            rows.append(("std::sort (scalar)", scalar_sort_ms(lib, sort_input)))
    base = rows[0][1]
    print(f"median filters of a {T:,}-step trace at width {width:,}, against numpy.sort of 1M float64:")
    for name, ms in rows:
        print(f"  {name:42s} {ms:8.1f} ms  ({ms / base:5.2f}x numpy.sort)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
