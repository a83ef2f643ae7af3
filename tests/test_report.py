"""Report and `compare` on fake run directories (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from llm_refine.errors import UserError
from llm_refine.history import write_history
from llm_refine.report import build_report, collect_runs, main_compare
from llm_refine.report.stats import best_cells, fairness_rows, loss_table, sweep_table
from llm_refine.train.rundir import RUN_CONFIG

PARAMS = {"cpu-0.5m": 400_000, "cpu-2m": 1_900_000, "cpu-8m": 7_800_000}


def make_run(
    run_dir: Path,
    *,
    size: str = "cpu-0.5m",
    schedule: str = "linear",
    label: str | None = None,
    seed: int = 0,
    loss: float = 4.0,
    steps: int = 40,
    lr: float = 1e-3,
    lr_multiplier: float | None = None,
    schedule_cfg: dict | None = None,
    marker: bool = True,
    eval_loss: float | None = None,
    data: dict | None = None,
) -> Path:
    """A finished run dir shaped like run_pretrain's output (plus the pipeline's marker)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sched = {"name": schedule, "warmup_steps": 4, **(schedule_cfg or {})}
    config = {
        "model": {"size": size},
        "data": data or {"source": "embedded", "seq_len": 32},
        "train": {"seed": seed, "learning_rate": lr, "max_steps": steps, "batch_size": 4},
        "schedule": sched,
        "output_dir": str(run_dir),
    }
    (run_dir / RUN_CONFIG).write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    norms = 5.0 * np.exp(-np.arange(steps) / steps) + rng.uniform(0, 0.5, steps)
    write_history(run_dir / "gradnorms.jsonl", [{"step": i, "l1": 100 * float(n), "l2": float(n)} for i, n in enumerate(norms)])
    with open(run_dir / "eval_log.jsonl", "w") as f:
        for i, s in enumerate(range(10, steps + 1, 10)):
            f.write(json.dumps({"step": s, "val_loss": loss + 2.0 / (i + 1)}) + "\n")
        f.write(json.dumps({"step": steps, "val_loss": loss}) + "\n")
    with open(run_dir / "train_log.jsonl", "w") as f:
        for s in range(0, steps, 5):
            f.write(json.dumps({"step": s, "loss": loss + 1, "lr": lr * (1 - s / steps)}) + "\n")
    (run_dir / f"checkpoint-{steps}").mkdir(exist_ok=True)
    summary = {
        "final_val_loss": loss, "perplexity": math.exp(loss), "tokens_seen": steps * 4 * 32, "wall_time_s": 1.5,
        "steps_per_s": 20.0, "max_steps": steps, "parameters": PARAMS.get(size, 1000), "size": size, "schedule": schedule,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if eval_loss is not None:
        (run_dir / "eval.json").write_text(json.dumps({"val_loss": eval_loss, "perplexity": math.exp(eval_loss), "tokens": 100}))
    if marker:
        (run_dir / "pipeline_stage.json").write_text(json.dumps({
            "stage": f"{size}/{run_dir.name}", "size": size, "schedule": label or schedule, "schedule_name": schedule,
            "seed": seed, "lr_multiplier": lr_multiplier, "spec_hash": "x",
        }))
    return run_dir


def make_sweep(out: Path, *, seeds=(0, 1), sizes=("cpu-0.5m", "cpu-2m"), losses=None) -> Path:
    losses = losses or {"linear": 4.0, "refined": 3.9, "cosine": 4.1}
    for size in sizes:
        shift = -0.5 if size == "cpu-2m" else 0.0
        for sched, base in losses.items():
            for seed in seeds:
                extra = {}
                if sched == "refined":
                    extra = {"file": str(out / size / "refined_schedule.json")}
                name = sched + (f"-seed{seed}" if len(seeds) > 1 else "")
                make_run(out / size / name, size=size, schedule=sched, seed=seed, loss=base + shift + 0.01 * seed,
                         schedule_cfg=extra)
        m = np.linspace(1, 0, 40)
        m[:4] = [0.2, 0.5, 0.8, 1.0]
        (out / size / "refined_schedule.json").write_text(json.dumps({
            "format": "llm-refine/schedule", "version": 1, "multipliers": m.tolist(),
            "provenance": {"source": str(out / size / "linear-seed0" / "gradnorms.jsonl"), "source_sha256": "ab" * 32,
                           "norm": "l1", "tau": 0.1},
            "diagnostics": {"degenerate": size == "cpu-2m", "degenerate_reason": "its peak is at 90% of the run", "peak_step": 3},
            "fit": {"warmup_fraction": 0.1},
        }))
    return out


def test_collect_runs_reads_labels_and_losses(tmp_path):
    make_sweep(tmp_path)
    runs = collect_runs([tmp_path])
    assert len(runs) == 12
    r = next(r for r in runs if r.size == "cpu-2m" and r.schedule == "refined" and r.seed == 1)
    assert r.final_val_loss == pytest.approx(3.41)
    assert r.loss_source == "summary.json"
    assert r.parameters == PARAMS["cpu-2m"]
    assert r.refined_file == tmp_path / "cpu-2m" / "refined_schedule.json"
    # checkpoint dirs are not runs, and a dir given twice is counted once
    assert len(collect_runs([tmp_path, tmp_path / "cpu-2m"])) == 12


def test_eval_json_wins_over_summary(tmp_path):
    make_run(tmp_path / "a", loss=4.0, eval_loss=3.5)
    (r,) = collect_runs([tmp_path])
    assert r.final_val_loss == 3.5 and r.loss_source == "eval.json"


def test_run_without_marker_uses_config_and_summary(tmp_path):
    make_run(tmp_path / "cpu-8m" / "whatever", size="cpu-8m", schedule="cosine", seed=3, marker=False)
    (r,) = collect_runs([tmp_path])
    assert (r.size, r.schedule, r.seed, r.peak_lr) == ("cpu-8m", "cosine", 3, 1e-3)


def test_loss_table_mean_std_and_paired_difference(tmp_path):
    make_sweep(tmp_path)
    header, rows = loss_table(collect_runs([tmp_path]))
    assert header == ["size", "params", "linear", "refined", "cosine"]
    assert [r[0] for r in rows] == ["cpu-0.5m", "cpu-2m"]  # ordered by parameters
    small = rows[0]
    assert small[1] == "400.0K"
    # linear: 4.00 and 4.01 -> mean 4.005, sample std 0.00707
    assert small[2] == "4.0050 ± 0.0071 (n=2)"
    # refined is 0.1 below linear at both seeds: Δ -0.1 with a zero-width interval, below 0
    assert small[3] == "3.9050 ± 0.0071 (n=2); Δ -0.1000 [-0.1000, -0.1000] better"
    assert small[4].endswith("Δ +0.1000 [+0.1000, +0.1000] worse")


def test_single_seed_has_no_spread(tmp_path):
    make_sweep(tmp_path, seeds=(0,))
    _, rows = loss_table(collect_runs([tmp_path]))
    assert rows[0][2] == "4.0000"
    assert "±" not in rows[0][3]
    assert rows[0][3] == "3.9000; Δ -0.1000 (one seed: no interval)"


def test_best_lr_is_chosen_per_schedule(tmp_path):
    # linear is best at lr×1, cosine at lr×2: the table compares each at its own best LR.
    for m, lin, cos in ((0.5, 4.3, 4.4), (1.0, 4.0, 4.2), (2.0, 4.1, 3.95)):
        make_run(tmp_path / f"linear-lr{m:g}", schedule="linear", loss=lin, lr=1e-3 * m, lr_multiplier=m)
        make_run(tmp_path / f"cosine-lr{m:g}", schedule="cosine", loss=cos, lr=1e-3 * m, lr_multiplier=m)
    runs = collect_runs([tmp_path])
    best = best_cells(runs)
    assert best[("cpu-0.5m", "linear")][0] == 1.0
    assert best[("cpu-0.5m", "cosine")][0] == 2.0
    _, rows = loss_table(runs)
    assert rows[0][2] == "4.0000" and rows[0][3].startswith("3.9500")
    sw = sweep_table(runs)
    assert sw is not None and sw[0] == ["size", "schedule", "lr×0.5", "lr×1", "lr×2"]
    _, frows = fairness_rows(runs)
    cos = next(r for r in frows if r[1] == "cosine")
    assert cos[2] == "0.002" and cos[3] == "2"


def test_fairness_detects_a_different_data_config(tmp_path):
    make_run(tmp_path / "linear", schedule="linear")
    make_run(tmp_path / "cosine", schedule="cosine")
    make_run(tmp_path / "refined", schedule="refined", data={"source": "embedded", "seq_len": 64})
    _, rows = fairness_rows(collect_runs([tmp_path]))
    same = {r[1]: r[-1] for r in rows}
    assert same == {"linear": "yes", "refined": "NO", "cosine": "yes"}


def test_build_report_writes_md_html_and_plots(tmp_path):
    make_sweep(tmp_path)
    paths = build_report(collect_runs([tmp_path]), tmp_path, title="t")
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert "| size | params | linear | refined | cosine |" in md
    assert "4.0050 ± 0.0071 (n=2)" in md
    assert "## Fairness settings" in md
    assert "DEGENERATE" in md  # cpu-2m's refinement is flagged, not hidden
    names = sorted(p.name for p in paths["plots"])
    assert names == sorted(
        ["final_loss_vs_size.png"]
        + [f"{k}-{s}.png" for s in ("cpu-0.5m", "cpu-2m") for k in ("schedules", "val_loss", "gradnorms")]
    )
    for p in paths["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({p.relative_to(tmp_path)})" in md
    assert html.count("data:image/png;base64,") == len(names)  # standalone: images embedded
    assert "<table>" in html and "4.0050 ± 0.0071 (n=2)" in html


def test_compare_rebuilds_report(tmp_path, capsys):
    make_sweep(tmp_path / "a", seeds=(0,))
    import argparse

    assert main_compare(argparse.Namespace(dirs=[str(tmp_path / "a")], out=str(tmp_path / "cmp"), title=None)) == 0
    assert (tmp_path / "cmp" / "report.md").exists() and (tmp_path / "cmp" / "report.html").exists()
    assert "6 runs" in capsys.readouterr().out
    with pytest.raises(UserError, match="--out"):
        main_compare(argparse.Namespace(dirs=[str(tmp_path / "a"), str(tmp_path / "a")], out=None, title=None))
    with pytest.raises(UserError, match="no such directory"):
        main_compare(argparse.Namespace(dirs=[str(tmp_path / "missing")], out=str(tmp_path), title=None))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no finished runs"):
        main_compare(argparse.Namespace(dirs=[str(tmp_path / "empty")], out=None, title=None))


def test_gradnorms_plot_draws_the_refinement_median_filter(tmp_path, monkeypatch):
    """The smoothed curve is the refinement's own median filter at the schedule's tau."""
    from llm_refine.report import plots as rep
    from llm_refine.history import write_history
    from llm_refine.refine import smooth_norms

    run_dir = tmp_path / "linear"
    vals = np.exp(-np.arange(100) / 30) + 0.5
    write_history(run_dir / "gradnorms.jsonl", [{"step": i, "l1": float(v), "l2": float(v) / 3} for i, v in enumerate(vals)])
    drawn = []
    real = rep.new_figure

    def spy(*a, **k):
        fig, axes = real(*a, **k)
        for ax in axes.ravel():
            orig = ax.plot
            ax.plot = lambda x, y, *aa, _o=orig, **kk: (drawn.append((kk.get("label", ""), np.asarray(y))), _o(x, y, *aa, **kk))[1]
        return fig, axes

    monkeypatch.setattr(rep, "new_figure", spy)
    run = type("R", (), {"history": run_dir / "gradnorms.jsonl", "size": "s"})()
    out = rep.plot_gradnorms(run, tmp_path / "g.png", tau=0.2)
    assert out.exists()
    smoothed = [y for label, y in drawn if label.startswith("median filter (width 21, tau 0.2)")]
    assert len(smoothed) == 2
    np.testing.assert_allclose(smoothed[0], smooth_norms(vals, 0.2))


def test_compare_keeps_separate_sweeps_apart(tmp_path):
    import argparse

    make_sweep(tmp_path / "a", seeds=(0,), sizes=("cpu-0.5m",))
    make_sweep(tmp_path / "b", seeds=(0,), sizes=("cpu-0.5m",), losses={"linear": 3.0, "refined": 2.9, "cosine": 3.1})
    assert main_compare(argparse.Namespace(dirs=[str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "c"), title=None)) == 0
    md = (tmp_path / "c" / "report.md").read_text()
    assert "| a/cpu-0.5m | 400.0K | 4.0000 |" in md and "| b/cpu-0.5m | 400.0K | 3.0000 |" in md
    assert "(n=2)" not in md  # not pooled as if they were two seeds
    assert (tmp_path / "c" / "plots" / "schedules-a-cpu-0.5m.png").exists()


def test_report_reads_compact_long_schedules(tmp_path):
    """A schedule over 100,000 steps is stored compactly (float32, base64); the report decodes it
    instead of seeing no multipliers; a file that does not validate is shown as it is."""
    import numpy as np

    from llm_refine.artifact import make_schedule_artifact, write_schedule
    from llm_refine.report.collect import read_artifact

    m = np.linspace(1.0, 0.0, 150_001)
    f = write_schedule(tmp_path / "long.json", make_schedule_artifact(m, provenance={"norm": "l1"}))
    assert "multipliers" not in json.loads(f.read_text())  # really the compact form
    art = read_artifact(f)
    assert isinstance(art["multipliers"], list) and len(art["multipliers"]) == m.size
    assert art["multipliers"][0] == 1.0 and art["multipliers"][-1] == 0.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "nope", "multipliers": [0, 0]}))
    assert read_artifact(bad) == {"format": "nope", "multipliers": [0, 0]}
    assert read_artifact(None) is None
