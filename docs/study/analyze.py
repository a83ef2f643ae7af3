"""Measurements behind docs/study/README.md: each linear baseline's l1 norm trend and the schedule
refined from it (what refine.from would give at that LR), the refined schedule's shape, and the
validation curves of every schedule at each LR (means over seeds), at cpu-0.5m and cpu-2m, and the
LR as trained at a few steps (seed 0)."""
import json, sys
from pathlib import Path
import numpy as np
from llm_refine.history import read_jsonl
from llm_refine.refine import smooth_norms, norm_trend, refine_schedule, describe_schedule
from llm_refine.artifact import read_schedule

root = Path(sys.argv[1]) / "cpu-0.5m"
print("## l1 norm trend of each linear baseline, and the schedule refined from it (tau 0.1)\n")
print("| LR | seed | l1 at step 0 | minimum (smoothed) at | end / minimum | refined: LR at step 0 | warm-up to 90% | above half | LR area vs linear |")
print("|---|---|---|---|---|---|---|---|---|")
for m in (1, 2, 4):
    for s in (0, 1, 2):
        _, rec = read_jsonl(root / f"linear-lr{m}-seed{s}" / "gradnorms.jsonl")
        l1 = np.array([r["l1"] for r in rec if "l1" in r])
        tr = norm_trend(smooth_norms(l1, 0.1))
        sch = refine_schedule(l1, norm="l1", tau=0.1)
        d = describe_schedule(sch)
        lin = np.linspace(1, 0, sch.size)
        area = sch.sum() / lin.sum()
        print(f"| x{m} | {s} | {l1[0]:.1f} | {tr['norm_min_fraction']:.0%} | x{tr['norm_rise_after_min']:.2f} | {sch[0]:.2f} | {d['warmup_steps']} | {d['above_half_fraction']:.0%} | {area:.2f} |")

art = read_schedule(root / "refined_schedule.json")
m = np.asarray(art["multipliers"])
print("\n## The refined schedule the runs used (from linear x2, seed 0) vs linear with its 10% warm-up\n")
steps = [0, 10, 25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]
lin = np.array([min(1.0, (t + 1) / 100) if t < 100 else 1 - (t - 100) / 900 for t in range(1000)])
print("| step | " + " | ".join(str(t) for t in steps) + " |")
print("|---" * (len(steps) + 1) + "|")
print("| refined | " + " | ".join(f"{m[t]:.2f}" for t in steps) + " |")
print("| linear (as trained) | " + " | ".join(f"{lin[t]:.2f}" for t in steps) + " |")

print("\n## Validation loss during training (mean over 3 seeds)\n")
SCHEDS = ("linear", "refined", "refined-agg", "refined-r2", "refined-xfer", "cosine", "wsd")
for size, lr in (("cpu-0.5m", 1), ("cpu-0.5m", 2), ("cpu-0.5m", 4), ("cpu-2m", None)):
    curves = {}
    tag = f"-lr{lr}" if lr else ""
    for sched in SCHEDS:
        rows = []
        for s in (0, 1, 2):
            f = root.parent / size / f"{sched}{tag}-seed{s}" / "eval_log.jsonl"
            if not f.exists():
                continue
            ev = {}
            for line in f.read_text().splitlines():
                r = json.loads(line)
                if "val_loss" in r:
                    ev[r["step"]] = r["val_loss"]
            rows.append(ev)
        if rows:
            ks = sorted(set.intersection(*(set(r) for r in rows)))
            curves[sched] = {k: float(np.mean([r[k] for r in rows])) for k in ks}
    ks = sorted(set.intersection(*(set(c) for c in curves.values())))
    print(f"{size}, peak LR " + (f"x{lr}" if lr else "x2 (the only one)") + ":\n")
    print("| schedule | " + " | ".join(f"step {k}" for k in ks) + " |")
    print("|---" * (len(ks) + 1) + "|")
    for sched, c in curves.items():
        print(f"| {sched} | " + " | ".join(f"{c[k]:.3f}" for k in ks) + " |")
    if "refined" in curves:
        print("| refined − linear | " + " | ".join(f"{curves['refined'][k] - curves['linear'][k]:+.3f}" for k in ks) + " |")
    print()

print("## LR as trained, as a share of the peak (seed 0)\n")
for size, tag in (("cpu-0.5m", "-lr2"), ("cpu-2m", "")):
    for sched in ("linear", "refined", "wsd"):
        f = root.parent / size / f"{sched}{tag}-seed0" / "train_log.jsonl"
        lr = {r["step"]: r["lr"] for r in map(json.loads, f.read_text().splitlines()) if "lr" in r}
        top = max(lr.values())
        print(f"{size} {sched:8s} " + " ".join(f"{t}:{lr.get(t, 0) / top:.2f}" for t in (1, 50, 100, 200, 300, 400, 600, 800, 999)))
