"""Benchmarks (``llm-refine bench``). Results are ratios measured in one run, never timed asserts.

refine: refine a synthetic 1,000,000-step trace with τ=0.1; time relative to ``numpy.sort`` of a
1,000,000-element float64 array in the same process; peak extra memory (tracemalloc, which sees
numpy's allocations) in units of one float64 array of length T.

history: write a 1,000,000-row history in each format the readers take (2-column CSV, W&B CSV
export, the recorder's JSONL); time `llm_refine.history.load_trace` on it as a ratio to the
library reader of the same file in the same run (``pandas.read_csv``; JSONL:
``pyarrow.json.read_json``), then run the whole ``llm-refine refine FILE -o X.json`` command in a
fresh process and report its wall time, its peak resident memory and the schedule file's size.
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


# Peak memory of the command's own process: VmHWM (per address space, so not the bench parent's
# footprint, which getrusage's ru_maxrss carries across fork + exec on Linux).
_CHILD = """
import resource, sys, time
t0 = time.perf_counter()
from llm_refine.cli import main
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
try:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH", rc, wall, hwm, file=sys.stderr)
"""


def write_history_files(directory, rows: int, seed: int = 0) -> dict:
    """1 file per format, ``rows`` rows each, from the same synthetic trace."""
    import os

    from .history import write_history

    v = synthetic_trace(rows, seed).tolist()
    paths = {}
    p = os.path.join(directory, "history.csv")
    with open(p, "w") as f:
        f.write("step,grad_norm\n")
        f.writelines(f"{i},{x!r}\n" for i, x in enumerate(v))
    paths["CSV"] = p
    p = os.path.join(directory, "wandb_export.csv")
    with open(p, "w") as f:
        f.write('"Step","run - train/grad_norm","run - train/grad_norm__MIN","run - train/grad_norm__MAX"\n')
        # W&B leaves a cell empty where the run logged nothing at that step (every 97th step here)
        f.writelines(f'"{i}","{x!r}","{x!r}","{x!r}"\n' if i % 97 else f'"{i}","","",""\n' for i, x in enumerate(v))
    paths["W&B CSV"] = p
    p = os.path.join(directory, "gradnorms.jsonl")
    write_history(p, ({"step": i, "l1": x, "l2": x / 10.0} for i, x in enumerate(v)), {"engine": "single", "bench": True})
    paths["JSONL"] = p
    return paths


def _run_refine(path: str, out: str) -> dict:
    import subprocess
    import sys

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, "refine", path, "-o", out], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("BENCH ")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"llm-refine refine {path} failed: {r.stderr.strip()[-500:]}")
    _, rc, inner, rss_kb = line[-1].split()
    return {"command_s": wall, "in_process_s": float(inner), "peak_rss_mb": int(rss_kb) / 1024}


def bench_history(rows: int = 1_000_000, repeats: int = 3, python_reader: bool = False) -> dict:
    """Reader time vs the library reader of the same file, and the whole command (see module doc)."""
    import os
    import tempfile

    from . import history

    try:
        import pandas
        import pyarrow.json as pajson
    except ImportError as e:  # the yardsticks are needed; the reader itself does not need them
        raise SystemExit(f"bench history needs pandas and pyarrow for its yardsticks ({e})")
    fast = history._arrow() is not None
    results = []
    with tempfile.TemporaryDirectory(prefix="llm-refine-bench-") as d:
        paths = write_history_files(d, rows)
        for fmt, path in paths.items():
            if fmt == "JSONL":
                ref_name, ref = "pyarrow.json.read_json", lambda: pajson.read_json(path)
            else:
                ref_name, ref = "pandas.read_csv", lambda: pandas.read_csv(path)
            ref()  # warm imports and the page cache
            history.load_trace(path)
            # Interleaved, best of each: on a shared machine the load changes between runs.
            t_ref = t_ours = float("inf")
            for _ in range(repeats):
                t_ref = min(t_ref, _best_of(ref, 1))
                t_ours = min(t_ours, _best_of(lambda: history.load_trace(path), 1))
            res = {
                "format": fmt,
                "rows": rows,
                "file_mb": os.path.getsize(path) / 1e6,
                "reader": "pyarrow" if fast else "python",
                "reader_s": t_ours,
                "reference": ref_name,
                "reference_s": t_ref,
                "ratio_reader_to_reference": t_ours / t_ref,
            }
            if python_reader:
                os.environ["LLM_REFINE_READER"] = "python"
                try:
                    res["python_reader_s"] = _best_of(lambda: history.load_trace(path), 1)
                finally:
                    del os.environ["LLM_REFINE_READER"]
            out = os.path.join(d, "schedule.json")
            res.update(_run_refine(path, out))
            res["schedule_mb"] = os.path.getsize(out) / 1e6
            results.append(res)
    return {"rows": rows, "repeats": repeats, "results": results, "target": "ratio_reader_to_reference <= 1.5"}


def print_history(r: dict) -> None:
    print(f"history I/O benchmark: {r['rows']:,} rows per file, reader times best of {r['repeats']} (interleaved)")
    for x in r["results"]:
        print(f"  {x['format']:<8} {x['file_mb']:6.1f} MB   reader ({x['reader']}) {x['reader_s']:6.3f} s   "
              f"{x['reference']} {x['reference_s']:6.3f} s   ratio {x['ratio_reader_to_reference']:.2f}x")
        if "python_reader_s" in x:
            print(f"           pure-Python reader {x['python_reader_s']:6.3f} s ({x['python_reader_s'] / x['reader_s']:.1f}x the reader)")
        print(f"           whole `llm-refine refine`: {x['command_s']:.2f} s (in-process {x['in_process_s']:.2f} s), "
              f"peak RSS {x['peak_rss_mb']:.0f} MB, schedule {x['schedule_mb']:.1f} MB")
    print(f"  target: {r['target']}")


def add_bench_arguments(p) -> None:
    p.add_argument("what", nargs="?", default="refine", choices=["refine", "history"], help="which benchmark (default: refine)")
    p.add_argument("--steps", type=int, default=1_000_000, help="trace length T / history rows (default 1,000,000)")
    p.add_argument("--python-reader", action="store_true", help="history: also time the pure-Python reader")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")


def main_bench(args) -> int:
    if args.what == "history":
        r = bench_history(args.steps, args.repeats, args.python_reader)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print_history(r)
        return 0
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
