"""Issue #10 items 2-3 with a fake launcher (no training): the tuned comparison (refine.from: best |
<multiplier> | each, the LR-edge warning) and the refinement variants (aggregation over seeds,
iterated rounds, transfer across sizes): stage plans, provenance, resume and stale schedules.
tiny.yaml's plan is pinned so existing recipes plan exactly what they did before."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from llm_refine.errors import UserError
from llm_refine.fileio import sha256_file
from llm_refine.history import write_history
from llm_refine.pipeline import Pipeline, plan
from llm_refine.pipeline.recipe import load_recipe, parse_recipe

from test_pipeline import FakeLauncher, fake_eval, fake_recipe, flat, states

REPO = Path(__file__).resolve().parents[1]


class LRLauncher(FakeLauncher):
    """FakeLauncher whose final loss depends on the LR multiplier: lowest at ``best`` (per label)."""

    def __init__(self, best=None, **kw):
        super().__init__(**kw)
        self.best = best or {}

    def train(self, stage):
        super().train(stage)
        rd = Path(stage.run_dir)
        s = json.loads((rd / "summary.json").read_text())
        best = self.best.get(stage.schedule, self.best.get("*", 1.0))
        s["final_val_loss"] += 0.1 * math.log2(stage.lr_multiplier / best) ** 2 + 0.01 * (stage.seed or 0)
        s["wall_time_s"], s["tokens_seen"] = 2.0, 40 * 8 * 64
        (rd / "summary.json").write_text(json.dumps(s))


def pipeline(tmp_path, launcher=None, **kw):
    recipe = parse_recipe(fake_recipe(**kw), check_pretrain=False)
    lines: list[str] = []
    return Pipeline(recipe, tmp_path / "out", launcher or LRLauncher(), print_fn=lines.append, evaluate_fn=fake_eval), lines


def prov(path: Path) -> dict:
    return json.loads(path.read_text())["provenance"]


# ---------------------------------------------------------------------------------------------
# Existing recipes plan exactly what they did


TINY_PLAN_SHA256 = "d0059fafc24d3b6293ea8e4bf0c287dc941d6604f4e812b165de2cee770c867c"  # computed with the code before issue #10 items 2-3


# recipes/tiny.yaml as it was before it got seeds and an LR grid (issue #10, item 6): a one-LR,
# one-seed recipe must keep planning exactly as it did before the variants and per-size grids.
OLD_TINY_YAML = """\
name: tiny
description: >-
  Three CPU sizes, 250 optimizer steps of 8 x 64 tokens each on the embedded corpus; linear
  (warm-up + linear decay, the baseline whose l1 gradient norms are refined), refined (tau 0.1,
  used as computed), cosine (same warm-up); same seed, data order and peak LR for all.
sizes: [cpu-0.5m, cpu-2m, cpu-8m]
schedules: [linear, refined, cosine]
seeds: [0]
lr_multipliers: [1.0]
refine:
  norm: l1        # l1 norms with weights 1/n: the paper's choice for Adam-type optimizers
  tau: 0.1        # median-filter width as a fraction of the run
  warmup: false   # the refined schedule is used as computed (its warm-up comes from the norms)
schedule:
  warmup_steps: 25   # linear and cosine: 10% warm-up
pretrain:
  data:
    source: embedded
    seq_len: 64
    vocab_size: 2048
    val_sequences: 48
  train:
    max_steps: 250
    batch_size: 8
    learning_rate: 0.003
    weight_decay: 0.1
    max_grad_norm: 1.0
    eval_every: 50
    save_every: 125
    log_every: 1
    print_every: 50
launch:
  launcher: inprocess
"""


def test_tiny_recipe_plans_exactly_as_before(tmp_path):
    out = (tmp_path / "o").resolve()
    f = tmp_path / "tiny.yaml"
    f.write_text(OLD_TINY_YAML, encoding="utf-8")
    stages = plan(load_recipe(f), out)
    assert [(s.id, s.deps) for s in stages] == [
        ("cpu-0.5m/linear", []), ("cpu-0.5m/refine", ["cpu-0.5m/linear"]), ("cpu-0.5m/refined", ["cpu-0.5m/refine"]),
        ("cpu-0.5m/cosine", []), ("cpu-0.5m/evaluate", ["cpu-0.5m/linear", "cpu-0.5m/refined", "cpu-0.5m/cosine"]),
        ("cpu-2m/linear", []), ("cpu-2m/refine", ["cpu-2m/linear"]), ("cpu-2m/refined", ["cpu-2m/refine"]),
        ("cpu-2m/cosine", []), ("cpu-2m/evaluate", ["cpu-2m/linear", "cpu-2m/refined", "cpu-2m/cosine"]),
        ("cpu-8m/linear", []), ("cpu-8m/refine", ["cpu-8m/linear"]), ("cpu-8m/refined", ["cpu-8m/refine"]),
        ("cpu-8m/cosine", []), ("cpu-8m/evaluate", ["cpu-8m/linear", "cpu-8m/refined", "cpu-8m/cosine"]),
        ("report", ["cpu-0.5m/evaluate", "cpu-2m/evaluate", "cpu-8m/evaluate"]),
    ]
    # ids, deps, run dirs, specs (their hash decides skip/resume) and every train config, as before
    rows = []
    for s in stages:
        row = {"id": s.id, "kind": s.kind, "deps": s.deps, "run_dir": str(s.run_dir) if s.run_dir else None,
               "spec": s.spec}
        if s.kind == "train":
            row["config"] = s.config.to_dict()
        rows.append(row)
    text = json.dumps(rows, sort_keys=True, default=str).replace(str(out), "<OUT>")
    assert hashlib.sha256(text.encode()).hexdigest() == TINY_PLAN_SHA256
    refined = next(s for s in stages if s.id == "cpu-2m/refined")
    assert refined.config.schedule.file == str(out / "cpu-2m" / "refined_schedule.json")


# ---------------------------------------------------------------------------------------------
# Recipe keys and their combinations


@pytest.mark.parametrize("refine, extra, match", [
    ({"from": 3.0}, {"lr_multipliers": [0.5, 1.0]}, r"refine\.from: 3 is not in lr_multipliers"),
    ({"from": "worst"}, {}, r"refine\.from: 'worst' is not"),
    ({"from": 1.0, "lr_multiplier": 1.0}, {}, r"refine\.lr_multiplier: and refine\.from both"),
    ({"aggregate": "median"}, {}, r"refine\.aggregate: 'median' aggregates over the baseline's seeds; list at least 2 seeds"),
    ({"aggregate": "max"}, {"seeds": [0, 1]}, r"refine\.aggregate: 'max' is not allowed"),
    ({"rounds": 0}, {}, r"refine\.rounds: 0 is out of range"),
    ({"rounds": 2}, {"schedules": ["linear", "cosine"]}, r"refine\.rounds: adds a variant .* list 'refined'"),
    ({"rounds": 2, "from": "each"}, {"lr_multipliers": [0.5, 1.0]}, r"refine\.rounds: cannot be combined with refine\.from: each"),
    ({"transfer_from": "cpu-8m"}, {}, r"refine\.transfer_from: 'cpu-8m' is not one of the recipe's sizes"),
    ({"transfer_from": "cpu-2m"}, {"sizes": ["cpu-2m"]}, r"refine\.transfer_from: needs at least 2 sizes"),
    ({"rounds": 2}, {"schedules": ["linear", "refined", {"name": "cosine", "label": "refined-r2"}]},
     r"schedules: label 'refined-r2' is the refine settings' variant column"),
    ({"from_": 1.0}, {}, r"refine\.from_: unknown key.*write 'from'"),
])
def test_bad_refine_settings_fail_up_front(refine, extra, match):
    with pytest.raises(UserError, match=match) as e:
        parse_recipe(fake_recipe(refine={"norm": "l1", **refine}, **extra), check_pretrain=False)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# refine.from: best (the default) / a multiplier / each


def test_refine_from_best_waits_for_the_sweep_and_picks_the_best_lr(tmp_path):
    pipe, lines = pipeline(tmp_path, LRLauncher(best={"linear": 2.0}), seeds=[0, 1], lr_multipliers=[0.5, 1.0, 2.0])
    by = pipe.by_id
    linear = [f"cpu-0.5m/linear-lr{m}-seed{s}" for m in ("0.5", "1", "2") for s in (0, 1)]
    assert by["cpu-0.5m/refine"].deps == linear
    assert by["cpu-0.5m/refined-lr0.5-seed1"].deps == ["cpu-0.5m/refine"]  # the refined schedule gets its own sweep
    assert by["cpu-0.5m/refine"].state() == "running"  # nothing to choose from yet
    assert pipe.run() == 0
    out = tmp_path / "out" / "cpu-0.5m"
    p = prov(out / "refined_schedule.json")
    chosen = p["pipeline"]["chosen"]
    assert chosen["lr_multiplier"] == 2.0 and chosen["edge"] == "upper" and set(chosen["mean_loss"]) == {"0.5", "1", "2"}
    # refine.seed (default: the first seed) picks the run at the best LR
    hist = out / "linear-lr2-seed0" / "gradnorms.jsonl"
    assert p["source"] == str(hist.resolve()) and p["source_sha256"] == sha256_file(hist)
    assert p["pipeline"]["sources"] == [{"path": str(hist.resolve()), "sha256": sha256_file(hist)}]
    line = next(ln for ln in lines if "cpu-0.5m/refine " in ln and "done" in ln)
    assert "from linear-lr2-seed0" in line and "best lr x2 (on the grid's upper edge)" in line
    # every refined run trains from that one schedule, at its own LR
    for m in ("0.5", "1", "2"):
        assert flat(by[f"cpu-0.5m/refined-lr{m}-seed0"].config)["schedule.file"] == str(out.resolve() / "refined_schedule.json")
    # the report says the best LR is on the grid's edge and which way to extend it
    md = (tmp_path / "out" / "report.md").read_text()
    assert "cpu-0.5m / linear: the best peak LR ×2 is the largest in the grid [×0.5, ×1, ×2]" in md
    assert "extend lr_multipliers upward (e.g. add ×4)" in md
    assert (tmp_path / "out" / "plots" / "loss_vs_lr-cpu-0.5m.png").exists()
    # tuned: each schedule at its own best LR against linear at its own best, paired by seed
    assert "Tuned comparison" in md and "| cpu-0.5m | refined | lr×1 | lr×2 |" in md
    # the gradient-norm plot shows the run the refinement read (the best LR's), not lr×1's
    from llm_refine.report import collect_runs
    from llm_refine.report.build import _refined_source
    from llm_refine.report.collect import refined_schedules

    runs = collect_runs([tmp_path / "out"])
    assert _refined_source(runs, refined_schedules(runs)["cpu-0.5m"]).run_dir.name == "linear-lr2-seed0"

    # rerun: everything skipped (the eval.json losses written later do not re-refine)
    pipe2, lines2 = pipeline(tmp_path, LRLauncher(best={"linear": 2.0}), seeds=[0, 1], lr_multipliers=[0.5, 1.0, 2.0])
    assert pipe2.run() == 0
    assert set(states(lines2)["cpu-0.5m/refine"]) == {"skipped"}
    assert all(v == ["skipped"] for k, v in states(lines2).items() if k.startswith("cpu-0.5m/refined"))

    # a different best LR (the baselines' losses changed) re-refines from it; the old refined runs are stale
    for s in (0, 1):
        f = out / f"linear-lr1-seed{s}" / "eval.json"
        ev = json.loads(f.read_text())
        ev["val_loss"] = 1.0
        f.write_text(json.dumps(ev))
    st = pipe2.by_id["cpu-0.5m/refine"]
    assert st.state() == "running" and st.resolve()["chosen"]["lr_multiplier"] == 1.0
    # the fake histories depend on the seed only: make the new source's norms differ
    write_history(out / "linear-lr1-seed0" / "gradnorms.jsonl",
                  [{"step": i, "l1": 3.0 + (i % 7) / 3, "l2": 0.3} for i in range(40)])
    st.execute(pipe2)
    assert prov(out / "refined_schedule.json")["pipeline"]["chosen"]["lr_multiplier"] == 1.0
    with pytest.raises(UserError, match="older refined_schedule.json"):
        pipe2.by_id["cpu-0.5m/refined-lr1-seed0"].state()


def test_refine_from_a_multiplier_and_legacy_lr_multiplier(tmp_path):
    for refine in ({"from": 0.5}, {"lr_multiplier": 0.5}):
        recipe = parse_recipe(fake_recipe(lr_multipliers=[0.5, 1.0], refine=refine), check_pretrain=False)
        by = {s.id: s for s in plan(recipe, tmp_path)}
        assert by["cpu-0.5m/refine"].deps == ["cpu-0.5m/linear-lr0.5"]
        assert by["cpu-0.5m/refine"].spec == {"baseline": "cpu-0.5m/linear-lr0.5", "norm": "l1", "tau": 0.1}


def test_refine_from_each_refines_every_lr_separately(tmp_path):
    pipe, lines = pipeline(tmp_path, lr_multipliers=[0.5, 1.0], refine={"from": "each"})
    by = pipe.by_id
    assert "cpu-0.5m/refine" not in by
    assert by["cpu-0.5m/refine-lr0.5"].deps == ["cpu-0.5m/linear-lr0.5"]
    assert by["cpu-0.5m/refined-lr0.5"].deps == ["cpu-0.5m/refine-lr0.5"]
    assert by["cpu-0.5m/refined-lr1"].deps == ["cpu-0.5m/refine-lr1"]
    out = (tmp_path / "out" / "cpu-0.5m").resolve()
    assert flat(by["cpu-0.5m/refined-lr1"].config)["schedule.file"] == str(out / "refined_schedule-lr1.json")
    assert pipe.run() == 0
    for m in ("0.5", "1"):
        p = prov(out / f"refined_schedule-lr{m}.json")
        assert p["source"] == str(out / f"linear-lr{m}" / "gradnorms.jsonl")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Refinement variants" in md
    assert "| cpu-0.5m | refined | cpu-0.5m/refined_schedule-lr0.5.json | ×0.5 |" in md


# ---------------------------------------------------------------------------------------------
# Variants: aggregation over seeds, rounds, transfer


def test_aggregated_refinement_lists_every_seed_and_resumes(tmp_path):
    kw = dict(seeds=[0, 1, 2], refine={"aggregate": "median"})
    pipe, lines = pipeline(tmp_path, **kw)
    by = pipe.by_id
    ids = [s.id for s in pipe.stages]
    assert ids[:8] == ["cpu-0.5m/linear-seed0", "cpu-0.5m/linear-seed1", "cpu-0.5m/linear-seed2", "cpu-0.5m/refine",
                       "cpu-0.5m/refined-seed0", "cpu-0.5m/refined-seed1", "cpu-0.5m/refined-seed2", "cpu-0.5m/refine-agg"]
    assert by["cpu-0.5m/refine-agg"].deps == ["cpu-0.5m/linear-seed0", "cpu-0.5m/linear-seed1", "cpu-0.5m/linear-seed2"]
    assert by["cpu-0.5m/refined-agg-seed1"].deps == ["cpu-0.5m/refine-agg"]
    assert pipe.run() == 0
    out = (tmp_path / "out" / "cpu-0.5m").resolve()
    p = prov(out / "refined_schedule-agg.json")
    hists = [out / f"linear-seed{s}" / "gradnorms.jsonl" for s in range(3)]
    assert p["sources"] == [{"path": str(h), "sha256": sha256_file(h)} for h in hists]
    assert p["aggregate"] == "median" and p["norm"] == "l1" and p["tau"] == 0.1
    assert (out / "refined_schedule-agg.png").exists()
    # the median of the three histories, refined
    from llm_refine.history import load_trace
    from llm_refine.refine import refine_schedule

    med = np.median(np.vstack([load_trace(h).values for h in hists]), axis=0)
    art = json.loads((out / "refined_schedule-agg.json").read_text())
    np.testing.assert_allclose(art["multipliers"], refine_schedule(med, norm="l1", tau=0.1), rtol=1e-12)
    assert flat(by["cpu-0.5m/refined-agg-seed2"].config)["schedule.file"] == str(out / "refined_schedule-agg.json")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "refined-agg" in md and "per-step median of" in md

    pipe2, lines2 = pipeline(tmp_path, **kw)
    assert pipe2.run() == 0 and states(lines2)["cpu-0.5m/refine-agg"] == ["skipped"]
    # a seed's history changed: re-aggregated, and the runs on the old schedule are refused
    write_history(hists[1], [{"step": i, "l1": 2.0 + (i % 5), "l2": 0.2} for i in range(40)])
    st = pipe2.by_id["cpu-0.5m/refine-agg"]
    assert st.state() == "running"
    st.execute(pipe2)
    with pytest.raises(UserError, match="older refined_schedule-agg.json"):
        pipe2.by_id["cpu-0.5m/refined-agg-seed0"].state()
    # histories of different lengths cannot be aggregated
    write_history(hists[2], [{"step": i, "l1": 3.0, "l2": 0.3} for i in range(30)])
    with pytest.raises(UserError, match="refine.aggregate needs histories of the same steps"):
        st.execute(pipe2)


def test_rounds_refine_from_the_previous_rounds_run(tmp_path):
    kw = dict(sizes=["cpu-0.5m"], lr_multipliers=[0.5, 1.0], refine={"rounds": 3})
    pipe, lines = pipeline(tmp_path, LRLauncher(best={"linear": 1.0, "refined": 0.5, "refined-r2": 1.0}), **kw)
    by = pipe.by_id
    assert by["cpu-0.5m/refine-r2"].deps == ["cpu-0.5m/refined-lr0.5", "cpu-0.5m/refined-lr1"]
    assert by["cpu-0.5m/refine-r3"].deps == ["cpu-0.5m/refined-r2-lr0.5", "cpu-0.5m/refined-r2-lr1"]
    assert by["cpu-0.5m/refined-r3-lr0.5"].deps == ["cpu-0.5m/refine-r3"]
    ids = [s.id for s in pipe.stages]
    assert ids.index("cpu-0.5m/refine-r2") > ids.index("cpu-0.5m/refined-lr1") and ids[-3:] == [
        "cpu-0.5m/cosine-lr1", "cpu-0.5m/evaluate", "report"]
    assert pipe.run() == 0
    out = (tmp_path / "out" / "cpu-0.5m").resolve()
    p2, p3 = prov(out / "refined_schedule-r2.json"), prov(out / "refined_schedule-r3.json")
    assert p2["source"] == str(out / "refined-lr0.5" / "gradnorms.jsonl")  # the best refined LR
    assert p2["pipeline"]["chosen"]["lr_multiplier"] == 0.5
    assert p3["source"] == str(out / "refined-r2-lr1" / "gradnorms.jsonl")
    assert p2["pipeline"]["settings"]["round"] == 2 and p3["pipeline"]["settings"]["source"] == "refined-r2"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| cpu-0.5m | refined-r2 |" in md and "(refined)" in md and "(refined-r2)" in md  # Δ vs previous round
    assert (tmp_path / "out" / "plots" / "refinements-cpu-0.5m.png").exists()
    # round 3's compute is its whole chain: refined-r2 at x1 <- refined at x0.5 <- linear at x1 (2 s each)
    from llm_refine.report import collect_runs
    from llm_refine.report.stats import schedule_compute

    _, wall, chain = schedule_compute(json.loads((out / "refined_schedule-r3.json").read_text()), collect_runs([tmp_path / "out"]))
    assert [r.run_dir.name for r in chain] == ["refined-r2-lr1", "refined-lr0.5", "linear-lr1"] and wall == 6.0
    pipe2, lines2 = pipeline(tmp_path, LRLauncher(best={"linear": 1.0, "refined": 0.5, "refined-r2": 1.0}), **kw)
    assert pipe2.run() == 0 and set(states(lines2)["cpu-0.5m/refine-r3"]) == {"skipped"}


def test_transfer_applies_one_sizes_schedule_resampled(tmp_path):
    kw = dict(refine={"transfer_from": "cpu-2m"}, size_overrides={"cpu-0.5m": ["train.max_steps=60"]})
    pipe, lines = pipeline(tmp_path, **kw)
    by = pipe.by_id
    ids = [s.id for s in pipe.stages]
    assert ids[0] == "cpu-2m/linear" and "cpu-2m/refined-xfer" not in by  # the source size first, no xfer of itself
    assert by["cpu-0.5m/refine-xfer"].deps == ["cpu-2m/refine"]
    assert by["cpu-0.5m/refined-xfer"].deps == ["cpu-0.5m/refine-xfer"]
    assert pipe.run() == 0
    out = (tmp_path / "out").resolve()
    art = json.loads((out / "cpu-0.5m" / "refined_schedule-xfer.json").read_text())
    src = out / "cpu-2m" / "refined_schedule.json"
    p = art["provenance"]
    assert p["source"] == str(src) and p["source_sha256"] == sha256_file(src) and p["transferred_from"] == "cpu-2m"
    assert p["refined_from"] == str(out / "cpu-2m" / "linear" / "gradnorms.jsonl")
    assert len(art["multipliers"]) == 60 and p["source_T"] == 40 and max(art["multipliers"]) == 1.0
    md = (out / "report.md").read_text()
    assert "Transferred vs per-size refined" in md and "(cpu-2m)" in md
    pipe2, lines2 = pipeline(tmp_path, **kw)
    assert pipe2.run() == 0 and states(lines2)["cpu-0.5m/refine-xfer"] == ["skipped"]
    # the source schedule changed (its baseline retrained): transfer again; runs on the old one are refused
    write_history(out / "cpu-2m" / "linear" / "gradnorms.jsonl", [{"step": i, "l1": 2.0 + (i % 5), "l2": 0.2} for i in range(40)])
    pipe2.by_id["cpu-2m/refine"].execute(pipe2)
    st = pipe2.by_id["cpu-0.5m/refine-xfer"]
    assert st.state() == "running"
    st.execute(pipe2)
    with pytest.raises(UserError, match="older refined_schedule-xfer.json"):
        pipe2.by_id["cpu-0.5m/refined-xfer"].state()


def test_interrupted_variant_run_resumes(tmp_path):
    kw = dict(seeds=[0, 1], sizes=["cpu-0.5m"], refine={"aggregate": "mean"})
    launcher = LRLauncher(interrupt={"cpu-0.5m/refined-agg-seed1"})
    pipe, lines = pipeline(tmp_path, launcher, **kw)
    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    pipe2, lines2 = pipeline(tmp_path, launcher, **kw)
    assert pipe2.run() == 0
    st = states(lines2)
    assert st["cpu-0.5m/refine-agg"] == ["skipped"] and st["cpu-0.5m/refined-agg-seed1"] == ["resumed", "done"]
    assert launcher.resumed_from["cpu-0.5m/refined-agg-seed1"] == "checkpoint-20"


def test_emit_slurm_chains_variant_refine_jobs_on_their_sources(tmp_path, monkeypatch):
    import yaml

    from llm_refine.pipeline.slurm import emit_slurm

    monkeypatch.chdir(tmp_path)
    raw = fake_recipe(seeds=[0, 1], lr_multipliers=[0.5, 1.0], refine={"aggregate": "mean", "rounds": 2, "transfer_from": "cpu-2m"})
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    pipe = Pipeline(parse_recipe(raw, path=str(recipe_path), check_pretrain=False), tmp_path / "out")
    submit = emit_slurm(pipe, recipe_arg=str(recipe_path))
    lines = [ln for ln in submit.read_text().splitlines() if "sbatch" in ln and "=$(" in ln]
    var = {ln.split()[-1].rstrip(")").removesuffix(".sbatch").split("-", 1)[1]: ln.split("=", 1)[0] for ln in lines}

    def deps(stage):
        ln = next(ln for ln in lines if ln.endswith(f"-{stage}.sbatch)"))
        return set(re.findall(r"\$(job\d+)", ln.split("--dependency=afterok:", 1)[1].split()[0])) if "--dependency" in ln else set()

    jobs = {k: v.lstrip("$") for k, v in var.items()}
    lin = {jobs[f"cpu-0.5m-linear-lr{m}-seed{s}"] for m in ("0.5", "1") for s in (0, 1)}
    assert deps("cpu-0.5m-refine") == lin  # best: waits for the whole sweep
    assert deps("cpu-0.5m-refine-agg") == lin
    assert deps("cpu-0.5m-refine-r2") == {jobs[f"cpu-0.5m-refined-lr{m}-seed{s}"] for m in ("0.5", "1") for s in (0, 1)}
    assert deps("cpu-0.5m-refine-xfer") == {jobs["cpu-2m-refine"]}
    assert deps("cpu-0.5m-refined-xfer-lr1-seed0") == {jobs["cpu-0.5m-refine-xfer"]}
    # the transfer's source size is submitted first
    assert lines.index(next(ln for ln in lines if "cpu-2m-refine.sbatch" in ln)) < lines.index(
        next(ln for ln in lines if "cpu-0.5m-refine-xfer.sbatch" in ln))
