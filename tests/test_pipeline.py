"""Pipeline stage logic with a fake launcher (no training): plan, skip/resume/run, failures,
provenance, `--emit slurm`. The real end-to-end run is in test_pipeline_e2e.py."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llm_refine.errors import UserError
from llm_refine.fileio import sha256_file
from llm_refine.history import write_history
from llm_refine.pipeline import Pipeline, add_pipeline_arguments, main_pipeline, plan
from llm_refine.pipeline.recipe import parse_recipe
from llm_refine.pipeline.slurm import emit_slurm

REPO = Path(__file__).resolve().parents[1]


def fake_recipe(**kw) -> dict:
    raw = {
        "name": "fake",
        "sizes": ["cpu-0.5m", "cpu-2m"],
        "schedules": ["linear", "refined", "cosine"],
        "seeds": [0],
        "refine": {"norm": "l1", "tau": 0.1},
        "schedule": {"warmup_steps": 4},
        "pretrain": {"train": {"max_steps": 40, "learning_rate": 1e-3}},
    }
    raw.update(kw)
    return raw


def flat(config) -> dict:
    """A run's resolved config as dotted keys (``train.seed``, ``schedule.name``, ...)."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(config.to_dict(), "")
    return out


def save_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint as the Trainer leaves it: only one with trainer_state.json counts (train.rundir)."""
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


class FakeLauncher:
    """Writes what run_pretrain would: config, history, logs, a checkpoint, summary.json last.

    ``interrupt``: stage ids that stop after their first checkpoint with KeyboardInterrupt (once).
    ``fail``: stage ids that raise RuntimeError.
    """

    def __init__(self, interrupt=(), fail=()):
        self.calls: list[str] = []
        self.interrupt = set(interrupt)
        self.fail = set(fail)
        self.resumed_from: dict[str, str | None] = {}

    def train(self, stage):
        self.calls.append(stage.id)
        rd = Path(stage.run_dir)
        ov = flat(stage.config)
        assert ov["output_dir"] == str(rd)
        # what the pipeline wrote for the run to train from is the stage's resolved config
        assert json.loads((rd / "run_config.json").read_text()) == stage.config.to_dict()
        if stage.id in self.fail:
            raise RuntimeError("boom")
        ckpts = sorted(rd.glob("checkpoint-*"))
        self.resumed_from[stage.id] = ckpts[-1].name if ckpts else None
        steps = stage.config.train.max_steps
        sched = {k.split(".", 1)[1]: v for k, v in ov.items() if k.startswith("schedule.")}
        if sched["name"] == "refined":
            assert Path(sched["file"]).exists()
        (rd / "run_config.json").write_text(json.dumps(stage.config.to_dict()))  # as run_pretrain does
        rng = np.random.default_rng(int(ov["train.seed"]))
        norms = 3 + np.exp(-np.arange(steps) / 10) + rng.uniform(0, 0.1, steps)
        write_history(rd / "gradnorms.jsonl", [{"step": i, "l1": float(n), "l2": float(n) / 10} for i, n in enumerate(norms)])
        save_checkpoint(rd, 20)
        if stage.id in self.interrupt:
            self.interrupt.discard(stage.id)
            raise KeyboardInterrupt
        save_checkpoint(rd, steps)
        loss = 4.0 + 0.1 * len(stage.schedule or "") - (0.5 if stage.size == "cpu-2m" else 0)
        (rd / "eval_log.jsonl").write_text(json.dumps({"step": steps, "val_loss": loss}) + "\n")
        (rd / "summary.json").write_text(json.dumps({"final_val_loss": loss, "max_steps": steps, "size": stage.size,
                                                     "parameters": 1000 if stage.size == "cpu-0.5m" else 4000}))


def fake_eval(run_dir: Path) -> dict:
    from llm_refine.train.rundir import EVAL_FILE

    s = json.loads((run_dir / "summary.json").read_text())
    res = {"val_loss": s["final_val_loss"] + 0.001, "perplexity": math.exp(s["final_val_loss"]), "tokens": 10,
           "summary_sha256": sha256_file(run_dir / "summary.json")}
    (run_dir / EVAL_FILE).write_text(json.dumps(res))
    return res


def make_pipeline(tmp_path, launcher=None, lines=None, **kw):
    recipe = parse_recipe(fake_recipe(**kw), check_pretrain=False)
    out = lines if lines is not None else []
    return Pipeline(recipe, tmp_path / "out", launcher or FakeLauncher(), print_fn=out.append, evaluate_fn=fake_eval), out


def states(lines: list[str]) -> dict[str, list[str]]:
    """stage id -> states printed for it, in order."""
    got: dict[str, list[str]] = {}
    for ln in lines:
        m = re.match(r"^\[\s*\d+/\d+\]\s+(\S+)\s+(\S+)", ln)
        if m:
            got.setdefault(m.group(1), []).append(m.group(2))
    return got


def test_plan_order_dirs_and_dependencies(tmp_path):
    recipe = parse_recipe(fake_recipe(seeds=[0, 1], lr_multipliers=[0.5, 1.0]), check_pretrain=False)
    stages = plan(recipe, tmp_path)
    ids = [s.id for s in stages]
    # Per size: linear runs, refine, refined runs, cosine runs, evaluate; the report last.
    assert ids[:6] == ["cpu-0.5m/linear-lr0.5-seed0", "cpu-0.5m/linear-lr0.5-seed1", "cpu-0.5m/linear-lr1-seed0",
                       "cpu-0.5m/linear-lr1-seed1", "cpu-0.5m/refine", "cpu-0.5m/refined-lr0.5-seed0"]
    assert ids[-1] == "report" and ids.count("cpu-2m/evaluate") == 1
    by = {s.id: s for s in stages}
    # refine.from: best (the default with an LR grid): the refine stage waits for every linear run of
    # the size and picks the best LR when it runs (tests/test_pipeline_variants.py).
    assert by["cpu-0.5m/refine"].deps == ["cpu-0.5m/linear-lr0.5-seed0", "cpu-0.5m/linear-lr0.5-seed1",
                                          "cpu-0.5m/linear-lr1-seed0", "cpu-0.5m/linear-lr1-seed1"]
    fixed = {s.id: s for s in plan(parse_recipe(fake_recipe(seeds=[0, 1], lr_multipliers=[0.5, 1.0], refine={"from": 1.0}),
                                                check_pretrain=False), tmp_path)}
    assert fixed["cpu-0.5m/refine"].deps == ["cpu-0.5m/linear-lr1-seed0"]  # a fixed multiplier: that run, first seed
    assert by["cpu-0.5m/refined-lr1-seed1"].deps == ["cpu-0.5m/refine"]
    ov = flat(by["cpu-0.5m/refined-lr0.5-seed1"].config)
    assert ov["schedule.file"] == str(tmp_path.resolve() / "cpu-0.5m" / "refined_schedule.json")
    assert ov["train.seed"] == 1 and ov["train.learning_rate"] == pytest.approx(5e-4)
    assert ov["schedule.warmup_steps"] == 0  # refined: used as computed (refine.warmup: false)
    lin = flat(by["cpu-0.5m/linear-lr1-seed1"].config)
    assert lin["schedule.name"] == "linear" and lin["schedule.warmup_steps"] == 4
    assert lin["train.learning_rate"] == 1e-3  # lr×1: the recipe's own LR
    # Same seed => same config apart from the schedule (fair comparison).
    cos = flat(by["cpu-0.5m/cosine-lr1-seed1"].config)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("schedule.") and k != "output_dir"}  # noqa: E731
    assert strip(cos) == strip(lin)


def test_single_seed_and_lr_give_plain_dir_names(tmp_path):
    stages = plan(parse_recipe(fake_recipe(), check_pretrain=False), tmp_path)
    assert [s.run_dir.name for s in stages if s.kind == "train"][:3] == ["linear", "refined", "cosine"]
    # Without evaluation the report follows the training stages directly.
    stages = plan(parse_recipe(fake_recipe(evaluate=False), check_pretrain=False), tmp_path)
    assert not any(s.kind == "evaluate" for s in stages)
    assert stages[-1].deps == [s.id for s in stages if s.kind == "train"]


def test_full_run_then_rerun_skips_everything(tmp_path):
    pipe, lines = make_pipeline(tmp_path)
    assert pipe.run() == 0
    out = tmp_path / "out"
    st = states(lines)
    assert st["cpu-0.5m/linear"] == ["running", "done"] and st["report"] == ["running", "done"]
    for size in ("cpu-0.5m", "cpu-2m"):
        art = json.loads((out / size / "refined_schedule.json").read_text())
        hist = out / size / "linear" / "gradnorms.jsonl"
        # Provenance points at the baseline's history, by path and by content.
        assert Path(art["provenance"]["source"]) == hist.resolve()
        assert art["provenance"]["source_sha256"] == sha256_file(hist)
        assert art["provenance"]["norm"] == "l1" and art["provenance"]["tau"] == 0.1
        assert (out / size / "refined_schedule.png").exists()
        for sched in ("linear", "refined", "cosine"):
            assert (out / size / sched / "eval.json").exists()
    state = json.loads((out / "pipeline_state.json").read_text())
    assert {v["state"] for v in state["stages"].values()} == {"done"}
    md = (out / "report.md").read_text()
    assert "| cpu-0.5m |" in md and "eval.json" in md
    assert (out / "report.html").exists() and (out / "plots" / "final_loss_vs_size.png").exists()

    launcher = FakeLauncher()
    pipe2, lines2 = make_pipeline(tmp_path, launcher)
    assert pipe2.run() == 0
    assert launcher.calls == []
    st2 = states(lines2)
    assert all(v == ["skipped"] for k, v in st2.items() if k != "report"), st2


def test_interrupt_mid_stage_then_resume(tmp_path):
    launcher = FakeLauncher(interrupt={"cpu-0.5m/refined"})
    pipe, lines = make_pipeline(tmp_path, launcher)
    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    assert states(lines)["cpu-0.5m/refined"] == ["running", "interrupted"]
    state = json.loads((tmp_path / "out" / "pipeline_state.json").read_text())
    assert state["stages"]["cpu-0.5m/refined"]["state"] == "interrupted"
    sha_before = sha256_file(tmp_path / "out" / "cpu-0.5m" / "refined_schedule.json")

    pipe2, lines2 = make_pipeline(tmp_path, launcher)
    assert pipe2.run() == 0
    st = states(lines2)
    assert st["cpu-0.5m/linear"] == ["skipped"] and st["cpu-0.5m/refine"] == ["skipped"]
    assert st["cpu-0.5m/refined"] == ["resumed", "done"]
    assert launcher.resumed_from["cpu-0.5m/refined"] == "checkpoint-20"
    assert st["cpu-0.5m/cosine"] == ["running", "done"]
    assert sha256_file(tmp_path / "out" / "cpu-0.5m" / "refined_schedule.json") == sha_before


def test_checkpoint_without_trainer_state_is_not_resumed(tmp_path):
    """One rule with pretraining (train.rundir.latest_checkpoint): a checkpoint-N the Trainer would
    ignore (no trainer_state.json, e.g. killed mid-save) is no reason to say "resumed"."""
    pipe, lines = make_pipeline(tmp_path, sizes=["cpu-0.5m"])
    stage = pipe.by_id["cpu-0.5m/linear"]
    stage.write_marker({"launched": "earlier"})
    (stage.run_dir / "checkpoint-20").mkdir()  # a half-saved checkpoint
    assert pipe.current_state(stage) == "running"
    save_checkpoint(stage.run_dir, 10)
    assert pipe.current_state(stage) == "resumed"
    assert pipe.run() == 0
    assert states(lines)["cpu-0.5m/linear"] == ["resumed", "done"]


def test_failed_stage_blocks_dependents_only(tmp_path):
    launcher = FakeLauncher(fail={"cpu-0.5m/linear"})
    pipe, lines = make_pipeline(tmp_path, launcher)
    assert pipe.run() == 1
    st = states(lines)
    assert st["cpu-0.5m/linear"] == ["running", "failed"]
    assert st["cpu-0.5m/refine"] == ["blocked"] and st["cpu-0.5m/refined"] == ["blocked"]
    assert st["cpu-0.5m/cosine"] == ["running", "done"]  # independent of the baseline
    assert st["cpu-2m/refined"] == ["running", "done"]  # the other size goes on
    assert any("RuntimeError: boom" in ln for ln in lines)
    # The next run retries the failed stage and finishes.
    pipe2, lines2 = make_pipeline(tmp_path, FakeLauncher())
    assert pipe2.run() == 0
    assert states(lines2)["cpu-0.5m/linear"] == ["running", "done"]


def test_changed_config_is_refused_not_overwritten(tmp_path):
    pipe, _ = make_pipeline(tmp_path)
    assert pipe.run() == 0
    raw = fake_recipe()
    raw["pretrain"]["train"]["max_steps"] = 41
    recipe = parse_recipe(raw, check_pretrain=False)
    launcher = FakeLauncher()
    with pytest.raises(UserError, match="different config.*new --out"):
        Pipeline(recipe, tmp_path / "out", launcher, print_fn=lambda s: None, evaluate_fn=fake_eval).run()
    assert launcher.calls == []


def test_new_baseline_history_reruns_refine(tmp_path):
    pipe, _ = make_pipeline(tmp_path)
    assert pipe.run() == 0
    by = {s.id: s for s in pipe.stages}
    assert pipe.current_state(by["cpu-0.5m/refine"]) == "skipped"
    hist = tmp_path / "out" / "cpu-0.5m" / "linear" / "gradnorms.jsonl"
    hist.write_text(hist.read_text().replace('"l1": 3', '"l1": 7'))
    assert pipe.current_state(by["cpu-0.5m/refine"]) == "running"
    # ...and refined runs trained on the old schedule are then refused rather than silently kept.
    pipe.refine_fn(hist, tmp_path / "out" / "cpu-0.5m" / "refined_schedule.json", norm="l1", tau=0.1)
    with pytest.raises(UserError, match="older refined_schedule.json"):
        pipe.current_state(by["cpu-0.5m/refined"])


def test_foreign_run_dir_is_refused(tmp_path):
    rd = tmp_path / "out" / "cpu-0.5m" / "linear"
    rd.mkdir(parents=True)
    (rd / "summary.json").write_text("{}")
    pipe, _ = make_pipeline(tmp_path)
    with pytest.raises(UserError, match="did not start"):
        pipe.run()


def test_only_stage_checks_dependencies(tmp_path):
    pipe, lines = make_pipeline(tmp_path)
    assert pipe.run(only=["cpu-0.5m/refine"]) == 1
    assert states(lines)["cpu-0.5m/refine"] == ["blocked"]
    with pytest.raises(UserError, match="unknown stage"):
        pipe.run(only=["nope"])
    assert pipe.run(only=["cpu-0.5m/linear"]) == 0
    assert pipe.run(only=["cpu-0.5m/refine"]) == 0
    assert (tmp_path / "out" / "cpu-0.5m" / "refined_schedule.json").exists()


def test_emit_slurm_scripts_are_valid_and_chained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("launch").mkdir()
    Path("launch/multinode.yaml").write_text("distributed_type: MULTI_GPU\n")
    Path("recipes").mkdir()
    Path("recipes/pretrain.py").write_text("")
    raw = fake_recipe(
        seeds=[0, 1],
        launch={"launcher": "accelerate", "config": "launch/multinode.yaml"},
        slurm={"nodes": 2, "gpus_per_node": 8, "time": "24:00:00", "partition": "gpu", "setup": ["source venv/bin/activate"]},
    )
    recipe_path = tmp_path / "r.yaml"
    import yaml

    recipe_path.write_text(yaml.safe_dump(raw))
    pipe = Pipeline(parse_recipe(raw, path=str(recipe_path), check_pretrain=False), tmp_path / "out")
    submit = emit_slurm(pipe, recipe_arg=str(recipe_path))
    scripts = sorted(submit.parent.glob("*.sbatch"))
    assert len(scripts) == len(pipe.stages) + 1 == 2 * (6 + 1 + 1) + 1 + 1  # + the data preparation job
    for f in [submit, *scripts]:
        r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, (f, r.stderr)
    text = submit.read_text()
    lines = [ln for ln in text.splitlines() if "sbatch" in ln and "=$(" in ln]
    assert len(lines) == len(scripts)
    var = {}
    for ln in lines:
        name = ln.split()[-1].rstrip(")")
        var[name] = ln.split("=", 1)[0]
    refine = next(n for n in var if n.endswith("cpu-0.5m-refine.sbatch"))
    refine_line = next(ln for ln in lines if ln.endswith(refine + ")"))
    baseline = next(n for n in var if n.endswith("cpu-0.5m-linear-seed0.sbatch"))
    assert f"--dependency=afterok:${var[baseline]} " in refine_line
    refined = next(ln for ln in lines if "cpu-0.5m-refined-seed1" in ln)
    assert f"--dependency=afterok:${var[refine]} " in refined
    # The report runs after every job, failed or not (afterany): it covers what finished.
    report = lines[-1]
    assert report.count("$job") == len(scripts) - 1 and "--dependency=afterany:" in report
    # First the data preparation, alone; every training job waits for it.
    assert lines[0].endswith("00-prepare.sbatch)") and "--dependency" not in lines[0]
    first = next(ln for ln in lines if baseline in ln)
    assert "--dependency=afterok:$job0 " in first
    # No job is left pending for ever when what it needs failed.
    assert all("--kill-on-invalid-dep=yes" in ln for ln in lines)
    for f in scripts:
        assert "#SBATCH --kill-on-invalid-dep=yes" in f.read_text(), f
    train = (submit.parent / baseline).read_text()
    assert "#SBATCH --nodes=2" in train and "#SBATCH --gpus-per-node=8" in train and "#SBATCH --partition=gpu" in train
    assert "srun --ntasks-per-node=1 bash -c" in train and "--machine_rank" in train and "--num_processes" in train
    # The rendezvous: the allocation's first node and the recipe's port unless the submitter set them.
    assert 'export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"' in train
    assert 'export MASTER_PORT="${MASTER_PORT:-29500}"' in train
    # The job records its stage: a start line after the setup lines, an EXIT trap before them.
    out_dir = tmp_path / "out"
    start = f"llm-refine pipeline {recipe_path} --out {out_dir} --stage cpu-0.5m/linear-seed0 --job-start"
    trap = f'llm-refine pipeline {recipe_path} --out {out_dir} --stage cpu-0.5m/linear-seed0 --job-exit "$rc"'
    assert start in train and trap in train
    assert train.index("trap _llm_refine_exit EXIT") < train.index("source venv/bin/activate") < train.index(start)
    prep = (submit.parent / "00-prepare.sbatch").read_text()
    assert "#SBATCH --nodes=1" in prep and "--gpus-per-node" not in prep and "source venv/bin/activate" in prep
    # one preparation per distinct data setting: both sizes here share one
    assert prep.count("--prepare-only") == 1
    assert re.search(r"^python -m llm_refine.train \S+/cpu-0.5m/linear-seed0/run_config.json --prepare-only$", prep, re.M), prep
    cfg_file = tmp_path / "out" / "cpu-0.5m" / "linear-seed0" / "run_config.json"
    assert f"-m llm_refine.train {cfg_file}'" in train and "source venv/bin/activate" in train
    # the job trains from the resolved config the emit wrote, not from command-line strings
    cfg = json.loads(cfg_file.read_text())
    assert cfg["model"]["size"] == "cpu-0.5m" and cfg["train"]["seed"] == 0 and cfg["schedule"] == {
        "name": "linear", "warmup_steps": 4, "warmup_ratio": 0.0, "min_ratio": 0.0}
    assert "--set" not in train
    ref = (submit.parent / refine).read_text()
    assert "#SBATCH --nodes=1" in ref
    assert f"llm-refine pipeline {recipe_path} --out {tmp_path / 'out'} --stage cpu-0.5m/refine" in ref
    # Markers let a later in-process `llm-refine pipeline` on the same --out recognise the runs.
    assert (tmp_path / "out" / "cpu-0.5m" / "linear-seed0" / "pipeline_stage.json").exists()


def test_main_pipeline_dry_run_and_emit(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(fake_recipe()))
    monkeypatch.setattr("llm_refine.pipeline.recipe.check_runs", lambda recipe: None)
    parser = add_pipeline_arguments(argparse.ArgumentParser())
    assert main_pipeline(parser.parse_args(["r.yaml", "--out", "o", "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "cpu-2m/refine" in out and "would run" in out
    assert main_pipeline(parser.parse_args(["r.yaml", "--out", "o", "--emit", "slurm"])) == 0
    assert (tmp_path / "o" / "slurm" / "submit.sh").exists()
    assert "sbatch scripts" in capsys.readouterr().out
    with pytest.raises(UserError, match="no such accelerate config"):
        main_pipeline(parser.parse_args(["r.yaml", "--out", "o", "--launcher", "accelerate", "--launch-config", "nope.yaml"]))


def test_degenerate_refinement_is_reported_not_hidden(tmp_path):
    from llm_refine.refine import refine_file

    def degenerate_refine(history, out_file, *, norm, tau):
        # Norms that collapse late in training: the paper's stated failure mode.
        norms = np.concatenate([np.full(30, 5.0), np.geomspace(5.0, 1e-4, 10)])
        write_history(history, [{"step": i, "l1": float(n), "l2": float(n)} for i, n in enumerate(norms)])
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return refine_file(history, out_file, norm=norm, tau=0.0)

    lines: list[str] = []
    recipe = parse_recipe(fake_recipe(sizes=["cpu-0.5m"]), check_pretrain=False)
    pipe = Pipeline(recipe, tmp_path / "out", FakeLauncher(), print_fn=lines.append, evaluate_fn=fake_eval,
                    refine_fn=degenerate_refine)
    assert pipe.run() == 0  # reported, and the refined run still uses it
    line = next(ln for ln in lines if "cpu-0.5m/refine " in ln and "done" in ln)
    assert "DEGENERATE (" in line
    md = (tmp_path / "out" / "report.md").read_text()
    assert "the refinement is DEGENERATE" in md
    assert (tmp_path / "out" / "cpu-0.5m" / "refined" / "summary.json").exists()


def test_user_error_in_a_stage_fails_that_stage_only(tmp_path):
    from llm_refine.errors import UserError as UE

    class Bad(FakeLauncher):
        def train(self, stage):
            if stage.id == "cpu-2m/cosine":
                raise UE("cosine: something the user must fix")
            return super().train(stage)

    pipe, lines = make_pipeline(tmp_path, Bad())
    assert pipe.run() == 1
    st = states(lines)
    assert st["cpu-2m/cosine"] == ["running", "failed"] and st["cpu-2m/evaluate"] == ["blocked"]
    assert st["report"] == ["running", "done"]  # the report still covers what finished
    assert lines[-1].startswith("pipeline: ") and "1 failed" in lines[-1] and "1 blocked" in lines[-1]
    state = json.loads((tmp_path / "out" / "pipeline_state.json").read_text())
    assert state["stages"]["cpu-2m/cosine"]["error"] == "cosine: something the user must fix"


def test_lr_sweep_and_seeds_through_the_pipeline(tmp_path):
    raw = fake_recipe(sizes=["cpu-0.5m"], seeds=[0, 1], lr_multipliers=[0.5, 1.0],
                      size_overrides={"cpu-0.5m": ["train.learning_rate=0.002"]})
    recipe = parse_recipe(raw, check_pretrain=False)
    by = {s.id: s for s in plan(recipe, tmp_path)}
    ov = flat(by["cpu-0.5m/cosine-lr0.5-seed1"].config)
    assert ov["train.learning_rate"] == pytest.approx(1e-3)  # 0.5 × the size's own LR
    assert flat(by["cpu-0.5m/cosine-lr1-seed1"].config)["train.learning_rate"] == 0.002
    pipe = Pipeline(recipe, tmp_path / "out", FakeLauncher(), print_fn=lambda s: None, evaluate_fn=fake_eval)
    assert pipe.run() == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Peak-LR sweep" in md and "(n=2)" in md


def test_a_second_pipeline_on_the_same_out_is_refused(tmp_path):
    from llm_refine.pipeline.state import OutLock as _OutLock

    out = tmp_path / "out"
    out.mkdir()
    pipe, _ = make_pipeline(tmp_path)
    with _OutLock(out, shared=False):
        with pytest.raises(UserError, match="another `llm-refine pipeline` is running"):
            pipe.run()
    with _OutLock(out, shared=True):  # a SLURM stage job holds it shared
        with pytest.raises(UserError, match="another"):
            pipe.run()  # a whole run needs it alone
        assert pipe.run(only=["cpu-0.5m/linear"]) == 0  # other stage jobs may run beside it
    assert pipe.run() == 0  # released


class ThreadRun:
    """A ChildRun stand-in: the fake training in a thread."""

    def __init__(self, fn):
        import threading

        self.error = None

        def body():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported through check()
                self.error = e

        self.thread = threading.Thread(target=body)
        self.thread.start()

    def poll(self):
        return None if self.thread.is_alive() else (1 if self.error else 0)

    def check(self):
        if self.error:
            raise RuntimeError(f"child failed: {self.error}")

    def terminate(self):
        self.thread.join()


class ParallelFake(FakeLauncher):
    def __init__(self, **kw):
        super().__init__(**kw)
        import threading

        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.order: list[tuple[str, str]] = []

    def start(self, stage, prefix=None):
        assert prefix == f"[{stage.id}]"

        def fn():
            import time

            with self.lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                self.order.append(("start", stage.id))
            time.sleep(0.15)
            try:
                self.train(stage)
            finally:
                with self.lock:
                    self.active -= 1
                    self.order.append(("end", stage.id))

        return ThreadRun(fn)


def test_jobs_run_trainings_in_parallel_in_dependency_order(tmp_path):
    launcher = ParallelFake(fail={"cpu-2m/cosine"})
    pipe, lines = make_pipeline(tmp_path, launcher)
    assert pipe.run(jobs=2) == 1
    assert launcher.max_active == 2  # two trainings at once, never more
    ev = launcher.order
    for size in ("cpu-0.5m", "cpu-2m"):
        # the refined run starts only after its baseline ended (and the refine stage ran)
        assert ev.index(("end", f"{size}/linear")) < ev.index(("start", f"{size}/refined"))
    st = states(lines)
    assert st["cpu-0.5m/refine"] == ["running", "done"] and st["cpu-0.5m/evaluate"] == ["running", "done"]
    assert st["cpu-2m/cosine"] == ["running", "failed"] and st["cpu-2m/evaluate"] == ["blocked"]
    assert st["report"] == ["running", "done"]
    # and a rerun with one job finishes what failed, skipping the rest
    pipe2, lines2 = make_pipeline(tmp_path, FakeLauncher())
    assert pipe2.run() == 0
    st2 = states(lines2)
    assert st2["cpu-2m/cosine"] == ["running", "done"] and st2["cpu-0.5m/refined"] == ["skipped"]


def test_python_launcher_command(tmp_path):
    from llm_refine.pipeline.launchers import PythonLauncher, make_launcher

    recipe = parse_recipe(fake_recipe(), check_pretrain=False)
    st = next(s for s in plan(recipe, tmp_path) if s.id == "cpu-2m/cosine")
    cmd = PythonLauncher().command(st)
    assert cmd[1:] == ["-m", "llm_refine.train", str(st.run_dir / "run_config.json")]
    assert isinstance(make_launcher(recipe, jobs=2), PythonLauncher)
    with pytest.raises(UserError, match="--jobs must be at least 1"):
        Pipeline(recipe, tmp_path / "o", FakeLauncher()).run(jobs=0)


def test_jobs_refused_with_multi_process_accelerate_config(tmp_path, monkeypatch):
    from llm_refine.pipeline.launchers import AccelerateLauncher, make_launcher

    monkeypatch.chdir(REPO)
    recipe = parse_recipe(fake_recipe(), check_pretrain=False)
    # one multi-process training at a time is fine, and so are parallel single-process ones
    assert isinstance(make_launcher(recipe, "accelerate", "launch/ddp.yaml", jobs=1), AccelerateLauncher)
    assert isinstance(make_launcher(recipe, "accelerate", "launch/single_cpu.yaml", jobs=2), AccelerateLauncher)
    for cfg in ("launch/ddp.yaml", "launch/fsdp.yaml", "launch/deepspeed_zero3.yaml", "launch/multinode.yaml"):
        with pytest.raises(UserError, match=rf"--jobs 2 with {cfg} .*rendezvous port.*use --jobs 1"):
            make_launcher(recipe, "accelerate", cfg, jobs=2)
    # the command line's --num_processes wins over the file
    recipe.launch.extra_args = ["--num_processes", "2"]
    with pytest.raises(UserError, match=r"\(2 processes on 1 machine"):
        make_launcher(recipe, "accelerate", "launch/single_cpu.yaml", jobs=3)
    recipe.launch.extra_args = ["--num_processes=1"]
    assert isinstance(make_launcher(recipe, "accelerate", "launch/ddp.yaml", jobs=2), AccelerateLauncher)
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_processes: [\n")
    with pytest.raises(UserError, match="cannot read this accelerate config"):
        make_launcher(recipe, "accelerate", str(bad), jobs=2)


def test_child_run_prefixes_output_and_reports_failure(capfd):
    import sys as _sys

    from llm_refine.pipeline.launchers import ChildRun

    run = ChildRun([_sys.executable, "-c", "print('a'); print(); print('b\\rc', flush=True)"], "[s/x]")
    assert run.wait() == 0
    run.check()
    assert capfd.readouterr().out.splitlines() == ["[s/x] a", "[s/x] b", "[s/x] c"]
    bad = ChildRun([_sys.executable, "-c", "raise SystemExit(3)"], None)
    assert bad.wait() == 3
    with pytest.raises(RuntimeError, match="exited with status 3"):
        bad.check()


def test_re_refining_the_same_history_does_not_make_the_refined_run_stale(tmp_path):
    """The refined run's marker holds a digest of the schedule's multipliers, not of the file (whose
    provenance has a creation time): deleting refined_schedule.json and rerunning re-refines the
    same multipliers and keeps the finished refined run; a changed schedule is still refused."""
    pipe, _ = make_pipeline(tmp_path)
    assert pipe.run() == 0
    f = tmp_path / "out" / "cpu-0.5m" / "refined_schedule.json"
    f.unlink()
    pipe2, lines = make_pipeline(tmp_path)
    assert pipe2.run() == 0
    st = states(lines)
    assert st["cpu-0.5m/refine"] == ["running", "done"] and st["cpu-0.5m/refined"] == ["skipped"]
    art = json.loads(f.read_text())
    art["multipliers"] = [m * 0.5 for m in art["multipliers"]]
    f.write_text(json.dumps(art))
    pipe3, _ = make_pipeline(tmp_path)
    with pytest.raises(UserError, match="was trained with an older refined_schedule.json"):
        pipe3.run()


def test_out_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    import yaml

    from llm_refine.cli import main

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(fake_recipe()))
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    assert main(["pipeline", str(tmp_path / "r.yaml"), "--out", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists and is not a directory" in err
    assert f.read_text() == "keep me"


def test_per_size_lr_grids(tmp_path):
    """`lr_multipliers` as a mapping: each size its own grid (the sweep at the small size, one LR at
    the large one); run dirs carry `-lr` only where the size sweeps; refine.from best becomes a
    fixed refinement at a one-LR size; every run's peak LR is its size's LR × its multiplier."""
    raw = fake_recipe(seeds=[0, 1], lr_multipliers={"cpu-0.5m": [1.0, 2.0, 4.0], "cpu-2m": [2.0]},
                      refine={"norm": "l1", "tau": 0.1, "from": "best"})
    recipe = parse_recipe(raw, check_pretrain=True)
    assert recipe.lr_grid("cpu-0.5m") == [1.0, 2.0, 4.0] and recipe.lr_grid("cpu-2m") == [2.0]
    assert recipe.lr_multipliers == [1.0, 2.0, 4.0]  # the union, for display
    assert recipe.refine_mode_at("cpu-0.5m") == "best" and recipe.refine_mode_at("cpu-2m") == "fixed"
    by = {s.id: s for s in plan(recipe, tmp_path)}
    small = [i for i in by if i.startswith("cpu-0.5m/linear")]
    assert small == [f"cpu-0.5m/linear-lr{m}-seed{s}" for m in (1, 2, 4) for s in (0, 1)]
    assert [i for i in by if i.startswith("cpu-2m/linear")] == ["cpu-2m/linear-seed0", "cpu-2m/linear-seed1"]
    assert by["cpu-2m/refine"].deps == ["cpu-2m/linear-seed0"]  # one LR: refined from it, first seed
    assert len(by["cpu-0.5m/refine"].deps) == 6  # best over the sweep
    assert flat(by["cpu-2m/refined-seed1"].config)["train.learning_rate"] == pytest.approx(2e-3)
    assert flat(by["cpu-0.5m/cosine-lr4-seed0"].config)["train.learning_rate"] == pytest.approx(4e-3)
    # A uniform mapping is the plain list; bad mappings fail with one line naming the key.
    same = parse_recipe(fake_recipe(lr_multipliers={"cpu-0.5m": [1.0], "cpu-2m": [1.0]}), check_pretrain=False)
    assert same.lr_multipliers == [1.0] and same.size_lr_multipliers == {}
    for bad, msg in (({"cpu-0.5m": [1.0]}, "has no grid for size 'cpu-2m'"),
                     ({"cpu-0.5m": [1.0], "cpu-2m": [1.0], "cpu-8m": [1.0]}, "names size 'cpu-8m'"),
                     ({"cpu-0.5m": [1.0], "cpu-2m": []}, "cpu-2m: is empty"),
                     ({"cpu-0.5m": [1.0], "cpu-2m": [-1.0]}, "lr_multipliers.cpu-2m")):
        with pytest.raises(UserError, match=re.escape(msg)):
            parse_recipe(fake_recipe(lr_multipliers=bad), check_pretrain=False)
    with pytest.raises(UserError, match=re.escape("size cpu-2m's lr_multipliers [2.0]")):
        parse_recipe(fake_recipe(lr_multipliers={"cpu-0.5m": [1.0, 2.0], "cpu-2m": [2.0]}, refine={"from": 1.0}),
                     check_pretrain=False)


# ---------------------------------------------------------------------------------------------
# The state under --emit slurm: concurrent jobs, a job's own record, the report job's reconciliation


def _hammer_state(out: Path, recipe, ids, stage, n: int) -> None:
    from llm_refine.pipeline.state import StateFile

    sf = StateFile(out, recipe, ids)
    for k in range(n):
        sf.set(stage, "running", count=k)


def test_state_file_concurrent_writers_lose_no_update(tmp_path):
    """Four processes rewrite their own stage's entry 40 times each at once: every entry ends at its
    last value (an unlocked read-modify-write loses some), and the file is always whole JSON."""
    import multiprocessing as mp

    pipe, _ = make_pipeline(tmp_path)
    stages = pipe.stages[:4]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer_state, args=(pipe.out, pipe.recipe, list(pipe.by_id), st, 40)) for st in stages]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    state = json.loads((pipe.out / "pipeline_state.json").read_text())["stages"]
    assert {st.id: state[st.id]["count"] for st in stages} == {st.id: 39 for st in stages}
    assert list(state) == [st.id for st in stages]  # in the recipe's order
    assert not list(pipe.out.glob(".pipeline_state.json.*"))  # no temp file left behind


def _slurm_states(pipe) -> dict[str, str]:
    return {sid: e["state"] for sid, e in json.loads((pipe.out / "pipeline_state.json").read_text())["stages"].items()}


def test_report_job_reconciles_a_failed_chain(tmp_path):
    """What the jobs of a chain leave (no Slurm needed): the baseline's job failed (its exit trap
    recorded it), its dependents' jobs were cancelled (no trace), the control run finished. The
    report job (`--stage report`) settles every stage and says so in report.md."""
    from llm_refine.pipeline.state import job_status_path

    pipe, lines = make_pipeline(tmp_path, sizes=["cpu-0.5m"])
    emit_slurm(pipe)
    assert set(_slurm_states(pipe).values()) == {"emitted"}
    assert pipe.record_job("cpu-0.5m/linear", job="11") == "running"
    assert pipe.record_job("cpu-0.5m/linear", exit_code=3, job="11") == "failed"
    assert pipe.run(only=["cpu-0.5m/cosine"]) == 0
    job_status_path(pipe.out, "prepare").parent.mkdir(parents=True)
    job_status_path(pipe.out, "prepare").write_text("0 10\n")
    assert pipe.run(only=["report"]) == 0
    assert _slurm_states(pipe) == {
        "cpu-0.5m/linear": "failed", "cpu-0.5m/refine": "blocked", "cpu-0.5m/refined": "blocked",
        "cpu-0.5m/cosine": "done", "cpu-0.5m/evaluate": "blocked", "report": "done"}
    state = json.loads((pipe.out / "pipeline_state.json").read_text())["stages"]
    assert state["cpu-0.5m/linear"]["exit_code"] == 3 and "exited with code 3" in state["cpu-0.5m/linear"]["error"]
    assert state["cpu-0.5m/refine"]["blocked_by"] == ["cpu-0.5m/linear"]
    assert any("cpu-0.5m/refine" in ln and "blocked" in ln and "needs cpu-0.5m/linear" in ln for ln in lines)
    report = (pipe.out / "report.md").read_text()
    assert "## Stages that did not finish" in report
    assert "| `cpu-0.5m/linear` | failed | slurm job 11 exited with code 3 |" in report
    assert "| `cpu-0.5m/evaluate` | blocked | (needs cpu-0.5m/linear, cpu-0.5m/refined) |" in report


def test_report_job_reconciles_interrupted_unrecorded_and_unprepared(tmp_path):
    """Jobs that left no record of their end: a checkpoint without summary (killed, resumable) is
    interrupted; a job whose exit file says it failed is failed; after a failed data preparation,
    the trainings that never ran are blocked by it."""
    from llm_refine.pipeline.state import job_status_path

    pipe, _ = make_pipeline(tmp_path, sizes=["cpu-0.5m"])
    emit_slurm(pipe)
    lin, cos = pipe.by_id["cpu-0.5m/linear"], pipe.by_id["cpu-0.5m/cosine"]
    pipe.record_job(lin.id, job="21")
    save_checkpoint(lin.run_dir, 20)  # then SIGKILL: no exit record
    job_status_path(pipe.out, cos.id).parent.mkdir(parents=True, exist_ok=True)
    job_status_path(pipe.out, cos.id).write_text("1 22\n")  # failed before llm-refine was on PATH
    job_status_path(pipe.out, "prepare").write_text("2 20\n")
    pipe.run(only=["report"])
    state = json.loads((pipe.out / "pipeline_state.json").read_text())["stages"]
    assert state[lin.id]["state"] == "interrupted" and "checkpoint" in state[lin.id]["error"]
    assert state[cos.id]["state"] == "failed" and state[cos.id]["slurm_job"] == "22"
    assert state["cpu-0.5m/refine"]["state"] == "blocked"
    # the dry run still says what is left to do, from disk
    assert pipe.by_id[lin.id].state() == "resumed"


def test_job_exit_without_result_is_a_failure_and_a_stage_run_keeps_its_record(tmp_path):
    pipe, _ = make_pipeline(tmp_path, sizes=["cpu-0.5m"])
    emit_slurm(pipe)
    pipe.record_job("cpu-0.5m/cosine", job="5")
    assert pipe.record_job("cpu-0.5m/cosine", exit_code=0, job="5") == "failed"
    assert "left no finished result" in pipe.state.entry("cpu-0.5m/cosine")["error"]
    # a --stage job records its own end (with its job id); the trap's record keeps it
    import os

    os.environ["SLURM_JOB_ID"] = "6"
    try:
        assert pipe.run(only=["cpu-0.5m/cosine"]) == 0
        assert pipe.record_job("cpu-0.5m/cosine", exit_code=0) == "done"
    finally:
        del os.environ["SLURM_JOB_ID"]
    e = pipe.state.entry("cpu-0.5m/cosine")
    assert e["state"] == "done" and e["slurm_job"] == "6" and e["exit_code"] == 0 and "error" not in e
    with pytest.raises(UserError, match="unknown stage"):
        pipe.record_job("nope", exit_code=0)
