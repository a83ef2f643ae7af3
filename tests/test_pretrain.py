"""Single-process pretraining runs: files, loss, history, LR, resume after a crash, errors."""

from __future__ import annotations

import json
import math

import pytest

from _pretrain_common import REPO, history_records, read_jsonl, tiny_overrides
from llm_refine.errors import UserError
from llm_refine.train.pretrain import load_pretrain_config, run_pretrain
from llm_refine.schedules import make_schedule

STEPS = 30


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    cfg = load_pretrain_config(REPO / "recipes" / "pretrain_tiny.yaml", tiny_overrides(out))
    summary = run_pretrain(cfg)
    return cfg, out, summary


def test_run_writes_every_file(reference_run):
    cfg, out, summary = reference_run
    for name in ("run_config.json", "gradnorms.jsonl", "train_log.jsonl", "eval_log.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert json.loads((out / "summary.json").read_text()) == summary
    resolved = json.loads((out / "run_config.json").read_text())
    assert resolved["train"]["max_steps"] == STEPS and resolved["runtime"]["world_size"] == 1
    # The resolved config loads back into the same config.
    assert load_pretrain_config(out / "run_config.json").to_dict() == cfg.to_dict()


def test_summary(reference_run):
    cfg, out, s = reference_run
    assert s["steps"] == s["max_steps"] == STEPS
    assert s["tokens_seen"] == STEPS * 8 * 128
    assert math.isfinite(s["final_val_loss"]) and s["perplexity"] == pytest.approx(math.exp(s["final_val_loss"]))
    assert s["parameters"] == 463_424 and s["size"] == "cpu-0.5m" and s["schedule"]["name"] == "linear"
    assert s["wall_time_s"] > 0 and s["steps_per_s"] > 0
    assert s["engine"]["distributed_type"] == "NO" and s["engine"]["world_size"] == 1


def test_loss_goes_down_and_history_has_every_step(reference_run):
    cfg, out, s = reference_run
    train = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in train] == list(range(STEPS))
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    evals = read_jsonl(out / "eval_log.jsonl")
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_loss"] == s["final_val_loss"]
    hist = history_records(out / "gradnorms.jsonl")
    assert [r["step"] for r in hist] == list(range(STEPS))
    assert all(r["l1"] > r["l2"] > 0 for r in hist)
    # The history is the pre-clip norm the Trainer also reports.
    assert [r["l2"] for r in hist] == pytest.approx([r["grad_norm"] for r in train], rel=1e-5)


def test_lr_follows_the_schedule(reference_run):
    cfg, out, s = reference_run
    fn = make_schedule(cfg.schedule, STEPS)
    lrs = [r["lr"] for r in read_jsonl(out / "train_log.jsonl")]
    assert lrs == pytest.approx([cfg.train.learning_rate * fn(i, STEPS) for i in range(STEPS)], rel=1e-9)


def test_evaluate_checkpoint_reproduces_the_final_val_loss(reference_run):
    from llm_refine.train.evaluate import evaluate_checkpoint

    cfg, out, s = reference_run
    r = evaluate_checkpoint(out / f"checkpoint-{STEPS}")
    assert r["val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-5)
    assert r["sequences"] == 16 and r["tokens"] == 16 * 127


def test_finished_run_is_not_trained_again(reference_run):
    cfg, out, s = reference_run
    before = (out / "train_log.jsonl").read_text()
    assert run_pretrain(cfg) == s
    assert (out / "train_log.jsonl").read_text() == before
    other = load_pretrain_config(REPO / "recipes" / "pretrain_tiny.yaml", tiny_overrides(out, "train.seed=1"))
    with pytest.raises(UserError, match="different config"):
        run_pretrain(other)


class _Crash(RuntimeError):
    pass


def _crash_at(step: int):
    from transformers import TrainerCallback

    class CrashCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise _Crash(f"simulated crash after step {step}")

    return CrashCallback()


def test_resume_after_a_crash_equals_the_uninterrupted_run(reference_run, tmp_path):
    cfg_ref, ref, _ = reference_run
    cfg = load_pretrain_config(REPO / "recipes" / "pretrain_tiny.yaml", tiny_overrides(tmp_path))
    # Crash as the 25th step ends (before it is logged): checkpoint-20 exists and steps 20..23
    # are already logged past it; the restart must drop and redo them.
    with pytest.raises(_Crash):
        run_pretrain(cfg, callbacks=[_crash_at(25)])
    assert not (tmp_path / "summary.json").exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == list(range(24))
    assert history_records(tmp_path / "gradnorms.jsonl")[-1]["step"] >= 20
    before = json.loads((tmp_path / "checkpoint-20" / "llm_refine_progress.json").read_text())
    summary = run_pretrain(cfg)
    assert summary["resumed_from_step"] == 20 and summary["steps"] == STEPS
    # Time of the whole run, not of its last segment.
    assert summary["segments"] == 2 and before["segments"] == 1
    assert summary["train_time_s"] > before["train_time_s"] > 0
    assert summary["steps_per_s"] == pytest.approx(STEPS / summary["train_time_s"], rel=1e-2)

    a, b = read_jsonl(ref / "train_log.jsonl"), read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in b] == list(range(STEPS))
    assert [r["lr"] for r in b] == [r["lr"] for r in a]  # LR at every step
    assert [r["batch"] for r in b] == [r["batch"] for r in a]  # the same batches
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    ha, hb = history_records(ref / "gradnorms.jsonl"), history_records(tmp_path / "gradnorms.jsonl")
    assert [r["step"] for r in hb] == list(range(STEPS))
    for x, y in zip(ha, hb):
        assert y["l1"] == pytest.approx(x["l1"], rel=1e-5) and y["l2"] == pytest.approx(x["l2"], rel=1e-5)
    ea, eb = read_jsonl(ref / "eval_log.jsonl"), read_jsonl(tmp_path / "eval_log.jsonl")
    assert [r["step"] for r in eb] == [10, 20, 30]
    assert [r["val_loss"] for r in eb] == pytest.approx([r["val_loss"] for r in ea], rel=1e-5)


def test_kill_between_final_checkpoint_and_summary_logs_the_final_evaluation_once(tmp_path):
    """A run killed after its last checkpoint but before summary.json is restarted: it resumes at
    the last step, evaluates, and writes the summary, without a second record of that evaluation."""
    cfg = load_pretrain_config(None, tiny_overrides(tmp_path, steps=12))
    first = run_pretrain(cfg)
    (tmp_path / "summary.json").unlink()  # what a kill right before the summary leaves
    again = run_pretrain(cfg)
    assert again["resumed_from_step"] == 12 and again["segments"] == 2
    assert again["final_val_loss"] == pytest.approx(first["final_val_loss"], rel=1e-6)
    assert [r["step"] for r in read_jsonl(tmp_path / "eval_log.jsonl")] == [10, 12]


def test_runs_differing_only_in_schedule_see_the_same_batches(reference_run, tmp_path):
    cfg_ref, ref, _ = reference_run
    cfg = load_pretrain_config(None, tiny_overrides(tmp_path, "schedule.name=cosine", steps=12))
    run_pretrain(cfg)
    a, b = read_jsonl(ref / "train_log.jsonl"), read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["batch"] for r in b] == [r["batch"] for r in a[:12]]
    assert [r["lr"] for r in b] != [r["lr"] for r in a[:12]]


def test_refined_schedule_file_drives_the_lr(tmp_path):
    from llm_refine.artifact import make_schedule_artifact, write_schedule

    mult = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
    path = tmp_path / "refined.json"
    write_schedule(path, make_schedule_artifact(mult, provenance={"source": "test"}))
    cfg = load_pretrain_config(None, tiny_overrides(tmp_path / "run", f"schedule.file={path}",
                                                    "schedule.warmup_steps=0", "train.eval_every=7", steps=7))
    assert cfg.schedule.name == "refined"
    run_pretrain(cfg)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "run" / "train_log.jsonl")]
    assert lrs == pytest.approx([0.003 * m for m in mult], abs=1e-12)


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown model size 'cpu-1t'"):
        load_pretrain_config(None, ["model.size=cpu-1t"])
    missing = load_pretrain_config(None, tiny_overrides(tmp_path / "a", "data.source=files",
                                                         f"data.path={tmp_path / 'nothing.jsonl'}"))
    with pytest.raises(UserError, match="nothing.jsonl does not exist"):
        run_pretrain(missing)
    bad = tmp_path / "schedule.json"
    bad.write_text(json.dumps({"multipliers": [1.0, 0.5, 0.0]}))  # no format header
    cfg = load_pretrain_config(None, tiny_overrides(tmp_path / "b", f"schedule.file={bad}"))
    with pytest.raises(UserError, match="not a schedule file"):
        run_pretrain(cfg)
    assert not (tmp_path / "b").exists()  # failed before writing anything
    with pytest.raises(UserError, match="unknown key"):
        load_pretrain_config(None, ["train.max_step=3"])
    with pytest.raises(UserError, match="not key=value"):
        load_pretrain_config(None, ["train.max_steps"])
    with pytest.raises(UserError, match="none.yaml: no such config file"):
        load_pretrain_config(tmp_path / "none.yaml")
    with pytest.raises(UserError, match="not a multiple"):
        run_pretrain(load_pretrain_config(None, tiny_overrides(tmp_path / "c", "train.micro_batch_size=3")))


def test_overrides_parse_values():
    cfg = load_pretrain_config({"train": {"max_steps": 5}}, ["train.learning_rate=1e-3", "train.bf16=true",
                                                             "schedule.name=wsd", "data.max_train_chars=null"])
    assert cfg.train.max_steps == 5 and cfg.train.learning_rate == 1e-3 and cfg.train.bf16 is True
    assert cfg.schedule.name == "wsd" and cfg.data.max_train_chars is None


def test_recipe_cli_in_process(tmp_path, capsys):
    import runpy

    mod = runpy.run_path(str(REPO / "recipes" / "pretrain.py"))
    rc = mod["main"]([str(REPO / "recipes" / "pretrain_tiny.yaml"), "--output_dir", str(tmp_path),
                      "--set", *tiny_overrides(tmp_path, steps=4)[1:], "train.eval_every=4"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["tokens_seen"] == 4 * 8 * 128
    rc = mod["main"]([str(REPO / "recipes" / "pretrain_tiny.yaml"), "--set", "model.size=nope"])
    assert rc == 2 and "unknown model size" in capsys.readouterr().err
    # repeated --set flags all count (the bad size comes first and must not be dropped)
    rc = mod["main"]([str(REPO / "recipes" / "pretrain_tiny.yaml"), "--output_dir", str(tmp_path / "r"),
                      "--set", "model.size=nope", "--set", "train.max_steps=1"])
    assert rc == 2 and "unknown model size" in capsys.readouterr().err
    rc = mod["main"]([str(REPO / "recipes" / "pretrain_tiny.yaml"), "--output_dir", str(tmp_path / "p"), "--prepare_only"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["train_sequences"] > 10_000
    assert not (tmp_path / "p").exists()


@pytest.mark.distributed  # starts a process
def test_resume_after_sigkill_equals_the_uninterrupted_run(reference_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    cfg_ref, ref, _ = reference_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_pretrain_kill.py"), str(tmp_path), "17"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (tmp_path / "checkpoint-10").is_dir() and not (tmp_path / "checkpoint-20").exists()
    cfg = load_pretrain_config(REPO / "recipes" / "pretrain_tiny.yaml", tiny_overrides(tmp_path))
    summary = run_pretrain(cfg)
    assert summary["resumed_from_step"] == 10
    a, b = read_jsonl(ref / "train_log.jsonl"), read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in b] == list(range(STEPS))
    assert [(r["lr"], r["batch"]) for r in b] == [(r["lr"], r["batch"]) for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    hb = history_records(tmp_path / "gradnorms.jsonl")
    assert [r["step"] for r in hb] == list(range(STEPS))
    assert [r["l2"] for r in hb] == pytest.approx([r["l2"] for r in history_records(ref / "gradnorms.jsonl")], rel=1e-5)
    assert [r["step"] for r in read_jsonl(tmp_path / "eval_log.jsonl")] == [10, 20, 30]


def test_crash_before_the_first_checkpoint_restarts_clean(tmp_path):
    cfg = load_pretrain_config(None, tiny_overrides(tmp_path, steps=12))
    with pytest.raises(_Crash):
        run_pretrain(cfg, callbacks=[_crash_at(6)])
    assert not list(tmp_path.glob("checkpoint-*")) and read_jsonl(tmp_path / "train_log.jsonl")
    summary = run_pretrain(cfg)
    assert summary["resumed_from_step"] == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == list(range(12))
    assert [r["step"] for r in history_records(tmp_path / "gradnorms.jsonl")] == list(range(12))


def test_run_on_c4_format_files(tmp_path):
    """A run on local files in C4's format (json.gz shards with a text field), as the tests write them."""
    import gzip

    from llm_refine.train.data import embedded_files

    shards = tmp_path / "c4" / "en"
    shards.mkdir(parents=True)
    paras = [p for _, f in embedded_files()[:40] for p in f.read_text(errors="replace").split("\n\n") if len(p) > 100]
    for k in range(2):
        with gzip.open(shards / f"c4-train.{k:05d}-of-01024.json.gz", "wt") as fh:
            for p in paras[k::2]:
                fh.write(json.dumps({"text": p, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x"}) + "\n")
    cfg = load_pretrain_config(None, tiny_overrides(tmp_path / "run", "data.source=files", f"data.path={shards}",
                                                    "data.vocab_size=512", "train.eval_every=6", steps=6))
    s = run_pretrain(cfg)
    assert s["steps"] == 6 and s["vocab_size"] == 512 and math.isfinite(s["final_val_loss"])
    runtime = json.loads((tmp_path / "run" / "run_config.json").read_text())["runtime"]
    assert runtime["data"]["source"] == "files" and runtime["data"]["val_documents"] > 0
