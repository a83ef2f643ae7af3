"""End to end with real training: a smaller-than-tiny recipe (two sizes, 24 steps), interrupted in
the middle of a training stage, then resumed to the end; stage files, provenance, report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import _pretrain_common  # noqa: F401  (points LLM_REFINE_CACHE at the session's test cache)
from llm_refine.fileio import sha256_file
from llm_refine.history import read_jsonl
from llm_refine.pipeline import Pipeline
from llm_refine.pipeline.launchers import InProcessLauncher
from llm_refine.pipeline.recipe import parse_recipe

STEPS = 24

RECIPE = {
    "name": "e2e",
    "sizes": ["cpu-0.5m", "cpu-2m"],
    "schedules": ["linear", "refined", "cosine"],
    "seeds": [0],
    "refine": {"norm": "l1", "tau": 0.1},
    "schedule": {"warmup_steps": 3},
    "pretrain": {
        # The data settings of the other pretraining tests, so the session's cache is shared.
        "data": {"val_sequences": 16},
        "train": {
            "max_steps": STEPS, "batch_size": 8, "learning_rate": 0.003, "eval_every": 12, "save_every": 12,
            "save_total_limit": None, "print_every": 0,
        },
    },
}


class Interrupt:
    """A TrainerCallback factory that raises KeyboardInterrupt (like Ctrl-C) once, right after the
    checkpoint at ``step`` of the stage ``stage_id`` is saved."""

    def __init__(self, stage_id: str, step: int):
        self.stage_id, self.step, self.fired = stage_id, step, False

    def __call__(self, stage):
        from transformers import TrainerCallback

        if stage.id != self.stage_id or self.fired:
            return []
        outer = self

        class _Cb(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                if state.global_step == outer.step:
                    outer.fired = True
                    raise KeyboardInterrupt

        return [_Cb()]


def states(lines):
    got = {}
    for ln in lines:
        m = re.match(r"^\[\s*\d+/\d+\]\s+(\S+)\s+(\S+)", ln)
        if m:
            got.setdefault(m.group(1), []).append(m.group(2))
    return got


def test_pipeline_end_to_end_with_interrupt_and_resume(tmp_path):
    out = tmp_path / "out"
    recipe = parse_recipe(RECIPE)
    interrupt = Interrupt("cpu-0.5m/refined", 12)
    lines: list[str] = []
    pipe = Pipeline(recipe, out, InProcessLauncher(callbacks_for=interrupt), print_fn=lines.append)
    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    assert interrupt.fired
    st = states(lines)
    assert st["cpu-0.5m/linear"] == ["running", "done"]
    assert st["cpu-0.5m/refine"] == ["running", "done"]
    assert st["cpu-0.5m/refined"] == ["running", "interrupted"]
    refined_dir = out / "cpu-0.5m" / "refined"
    assert (refined_dir / "checkpoint-12").is_dir() and not (refined_dir / "summary.json").exists()
    state = json.loads((out / "pipeline_state.json").read_text())
    assert state["stages"]["cpu-0.5m/refined"]["state"] == "interrupted"

    lines2: list[str] = []
    pipe2 = Pipeline(parse_recipe(RECIPE), out, InProcessLauncher(), print_fn=lines2.append)
    assert pipe2.run() == 0
    st2 = states(lines2)
    assert st2["cpu-0.5m/linear"] == ["skipped"] and st2["cpu-0.5m/refine"] == ["skipped"]
    assert st2["cpu-0.5m/refined"] == ["resumed", "done"]
    for sid in ("cpu-0.5m/cosine", "cpu-2m/linear", "cpu-2m/refine", "cpu-2m/refined", "cpu-2m/cosine", "report"):
        assert st2[sid] == ["running", "done"], (sid, lines2)

    # The resumed run continued from its checkpoint and its history has every step exactly once.
    summary = json.loads((refined_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 12 and summary["steps"] == STEPS
    _, recs = read_jsonl(refined_dir / "gradnorms.jsonl")
    assert [r["step"] for r in recs] == list(range(STEPS))

    for size in ("cpu-0.5m", "cpu-2m"):
        # Stage files.
        for sched in ("linear", "refined", "cosine"):
            rd = out / size / sched
            for f in ("run_config.json", "gradnorms.jsonl", "summary.json", "eval.json", "pipeline_stage.json", "eval_log.jsonl"):
                assert (rd / f).is_file(), rd / f
            ev = json.loads((rd / "eval.json").read_text())
            s = json.loads((rd / "summary.json").read_text())
            # Evaluating the final checkpoint reproduces the run's own final validation loss.
            assert ev["val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-4)
            cfg = json.loads((rd / "run_config.json").read_text())
            assert cfg["schedule"]["name"] == sched and cfg["train"]["seed"] == 0 and cfg["model"]["size"] == size
        # Provenance: the refined schedule came from this size's baseline history, and the refined
        # run trained on that very file.
        f = out / size / "refined_schedule.json"
        art = json.loads(f.read_text())
        hist = out / size / "linear" / "gradnorms.jsonl"
        assert Path(art["provenance"]["source"]) == hist.resolve()
        assert art["provenance"]["source_sha256"] == sha256_file(hist)
        assert art["provenance"]["norm"] == "l1" and len(art["multipliers"]) == STEPS
        rcfg = json.loads((out / size / "refined" / "run_config.json").read_text())
        assert Path(rcfg["schedule"]["file"]) == f.resolve()
        marker = json.loads((out / size / "refined" / "pipeline_stage.json").read_text())
        from llm_refine.pipeline.stages import schedule_digest

        assert marker["schedule_sha256"] == schedule_digest(f)  # the multipliers' digest (not the file's)
        # Same data order and peak LR as the baseline: only the schedule differs.
        lin = json.loads((out / size / "linear" / "run_config.json").read_text())
        assert rcfg["data"] == lin["data"] and rcfg["train"] == lin["train"]

    md = (out / "report.md").read_text()
    table = md.split("## Final validation loss", 1)[1].split("\n\n")[1]
    assert table.splitlines()[0] == "| size | params | linear | refined | cosine |"
    rows = table.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["cpu-0.5m", "cpu-2m"]
    lin_loss = json.loads((out / "cpu-2m" / "linear" / "eval.json").read_text())["val_loss"]
    assert f"{lin_loss:.4f}" in rows[1]
    for name in ("final_loss_vs_size", "schedules-cpu-0.5m", "val_loss-cpu-2m", "gradnorms-cpu-2m"):
        p = out / "plots" / f"{name}.png"
        assert p.read_bytes()[:4] == b"\x89PNG" and f"(plots/{name}.png)" in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 7


@pytest.mark.distributed  # `accelerate launch` starts a training subprocess
def test_accelerate_launcher_runs_a_stage(tmp_path, monkeypatch):
    """One stage through `accelerate launch --config_file launch/single_cpu.yaml -m llm_refine.train
    <run_dir>/run_config.json`, from a directory outside the repository (the packaged entry point)."""
    import argparse

    from llm_refine.pipeline import add_pipeline_arguments, main_pipeline

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # no checkout path is needed: the launcher runs `-m llm_refine.train`
    raw = dict(RECIPE, sizes=["cpu-0.5m"])
    raw["pretrain"] = {**RECIPE["pretrain"], "train": {**RECIPE["pretrain"]["train"], "max_steps": 12}}
    f = tmp_path / "r.yaml"
    import yaml

    f.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    args = add_pipeline_arguments(argparse.ArgumentParser()).parse_args(
        [str(f), "--out", str(out), "--launch-config", str(repo / "launch" / "single_cpu.yaml"), "--stage", "cpu-0.5m/linear"]
    )
    assert main_pipeline(args) == 0
    rd = out / "cpu-0.5m" / "linear"
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["schedule"]["name"] == "linear"
    cfg = json.loads((rd / "run_config.json").read_text())
    assert cfg["train"]["max_steps"] == 12 and cfg["schedule"]["warmup_steps"] == 3
    _, recs = read_jsonl(rd / "gradnorms.jsonl")
    assert [r["step"] for r in recs] == list(range(12))
    state = json.loads((out / "pipeline_state.json").read_text())
    assert state["stages"]["cpu-0.5m/linear"]["state"] == "done"
