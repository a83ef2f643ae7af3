"""`llm-refine pipeline --emit slurm` on a real (local, single-machine) Slurm cluster.

A cluster of two slurmd "nodes" on loopback (`_cluster_slurm.SlurmCluster`; skipped with the reason
when Slurm is not installed or we are not root) runs the emitted ``submit.sh`` for a one-size
recipe (cpu-0.5m, 20 steps, linear → refine → refined, cosine, evaluate, report):

- the whole chain: every job COMPLETED in dependency order, every stage's output on disk, the
  report written, and the pipeline itself (``--dry-run`` afterwards) sees every stage finished;
- a failed job (the baseline training, made to fail by a ``slurm.setup`` line): its dependents
  never run (``afterok`` → ``DependencyNeverSatisfied``, cancelled by ``kill_invalid_depend``), the
  unrelated control run still finishes, and the pipeline sees exactly what is left to do.

Two strict xfails record what the pipeline does not do yet under Slurm (see their reasons): the
training jobs never write ``pipeline_state.json``, and a failure leaves no trace in it (nor a report,
since the report job waits ``afterok`` on everything).

Timing (2-core machine at load ≈ 7): cluster start ≈ 1 s, the full chain ≈ 140 s, the failing
chain ≈ 60 s.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from _cluster_slurm import SlurmCluster, cluster_fixture
from _pretrain_common import REPO, history_records

pytestmark = [pytest.mark.distributed, pytest.mark.cluster]

CHAIN_TIMEOUT = 900  # seconds for a whole chain of jobs to drain
SIZE = "cpu-0.5m"
TRAIN = ("linear", "refined", "cosine")
STAGES = [f"{SIZE}/linear", f"{SIZE}/refine", f"{SIZE}/refined", f"{SIZE}/cosine", f"{SIZE}/evaluate", "report"]


def _recipe(path, name: str, setup: list[str] | None = None):
    recipe = {
        "name": name,
        "sizes": [SIZE],
        "schedules": list(TRAIN),
        "seeds": [0],
        "schedule": {"warmup_steps": 2},
        "pretrain": {
            "data": {"source": "embedded", "seq_len": 64, "vocab_size": 2048, "val_sequences": 8},
            "train": {"max_steps": 20, "batch_size": 8, "learning_rate": 0.003, "eval_every": 10,
                      "save_every": 10, "print_every": 0},
        },
    }
    if setup:
        recipe["slurm"] = {"setup": setup}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _pipeline(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "llm_refine.cli", "pipeline", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _dry_run(recipe, out) -> dict[str, str]:
    """stage id -> what ``llm-refine pipeline --dry-run`` says it would do."""
    lines = _pipeline(str(recipe), "--out", str(out), "--dry-run").stdout.splitlines()
    found = {}
    for line in lines:
        m = re.match(r"\[\s*\d+/\d+\]\s+(\S+)\s+(.+?)\s*$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def _submit(cluster: SlurmCluster, recipe, out) -> dict:
    """Emit, submit with submit.sh, wait for the queue to drain; the jobs' ids, records and timing."""
    _pipeline(str(recipe), "--out", str(out), "--emit", "slurm")
    t0 = time.monotonic()
    sub = cluster.run(["bash", str(out / "slurm" / "submit.sh")], cwd=REPO, timeout=60)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    ids = dict(re.findall(r"^(\S+): job (\d+)$", sub.stdout, re.M))
    assert list(ids) == STAGES, sub.stdout
    ids = {k: int(v) for k, v in ids.items()}
    cluster.wait_queue_empty(CHAIN_TIMEOUT)
    wall = time.monotonic() - t0
    records = cluster.final_states()
    info = {sid: cluster.job_info(j) for sid, j in ids.items()}
    return {"ids": ids, "records": {sid: records.get(j, {}) for sid, j in ids.items()}, "info": info, "wall": wall}


cluster = cluster_fixture()


def test_local_cluster_runs_jobs_and_cancels_a_broken_chain(cluster, tmp_path):
    """The cluster itself: two nodes, a job per node, afterok after a failure is cancelled, afterany is not."""
    srun = cluster.run(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME"],
                       timeout=60)
    assert srun.returncode == 0, srun.stderr
    assert sorted(srun.stdout.splitlines()) == [f"0 {cluster.nodes[0]}", f"1 {cluster.nodes[1]}"]
    bad = cluster.sbatch("-o", str(tmp_path / "bad.out"), "--wrap", "exit 3")
    never = cluster.sbatch("--dependency=afterok:%d" % bad, "-o", str(tmp_path / "never.out"), "--wrap", "echo ran")
    anyway = cluster.sbatch("--dependency=afterany:%d:%d" % (bad, never), "-o", str(tmp_path / "any.out"),
                            "--wrap", "echo ran")
    cluster.wait_queue_empty(120)
    st = cluster.final_states()
    assert st[bad]["JobState"] == "FAILED" and st[bad]["ExitCode"] == "3:0"
    assert st[never]["JobState"] == "CANCELLED" and st[never]["NodeList"] == "(null)"
    assert cluster.job_info(never).get("Reason") == "DependencyNeverSatisfied"
    assert not (tmp_path / "never.out").exists()
    assert st[anyway]["JobState"] == "COMPLETED" and (tmp_path / "any.out").read_text() == "ran\n"


# ---------------------------------------------------------------------------------------------
# The whole pipeline as a chain of jobs


@pytest.fixture(scope="module")
def chain(cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    recipe = _recipe(d / "recipe.yaml", "slurm-chain")
    out = d / "out"
    res = _submit(cluster, recipe, out)
    print(f"\nslurm chain: {res['wall']:.0f}s for {len(res['ids'])} jobs")
    return {"recipe": recipe, "out": out, "nodes": cluster.nodes, **res}


def test_pipeline_chain_runs_to_the_report(chain):
    out, ids, records = chain["out"], chain["ids"], chain["records"]
    logs = out / "slurm" / "logs"
    for sid in STAGES:
        rec = records[sid]
        log = "\n".join(p.read_text()[-2000:] for p in logs.glob(f"*-{ids[sid]}.out"))
        assert rec.get("JobState") == "COMPLETED" and rec.get("ExitCode") == "0:0", (sid, rec, log)
        assert rec["NodeList"] in chain["nodes"]
    # Dependencies held: nothing started before what it needs had ended.
    start = {sid: records[sid]["StartTime"] for sid in STAGES}
    end = {sid: records[sid]["EndTime"] for sid in STAGES}
    for sid, needs in [(f"{SIZE}/refine", [f"{SIZE}/linear"]), (f"{SIZE}/refined", [f"{SIZE}/refine"]),
                       (f"{SIZE}/evaluate", [f"{SIZE}/linear", f"{SIZE}/refined", f"{SIZE}/cosine"]),
                       ("report", [f"{SIZE}/evaluate"])]:
        assert all(start[sid] >= end[n] for n in needs), (sid, start, end)

    size_dir = out / SIZE
    for label in TRAIN:
        rd = size_dir / label
        summary = json.loads((rd / "summary.json").read_text())
        assert summary["steps"] == 20 and summary["engine"]["distributed_type"] == "NO"
        assert summary["engine"]["world_size"] == 1
        ev = json.loads((rd / "eval.json").read_text())
        assert ev["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
        hist = history_records(rd / "gradnorms.jsonl")
        assert [r["step"] for r in hist] == list(range(20))
    art = json.loads((size_dir / "refined_schedule.json").read_text())
    assert art["provenance"]["source"] == str(size_dir / "linear" / "gradnorms.jsonl")
    refined_cfg = json.loads((size_dir / "refined" / "run_config.json").read_text())
    assert refined_cfg["schedule"]["name"] == "refined"
    assert refined_cfg["schedule"]["file"] == str(size_dir / "refined_schedule.json")

    report = (out / "report.md").read_text()
    assert "| cpu-0.5m |" in report and all(label in report for label in TRAIN)
    assert (out / "report.html").is_file()

    # The pipeline, run afterwards on the same --out, finds every stage finished.
    plan = _dry_run(chain["recipe"], out)
    assert plan == {**{sid: "would skip" for sid in STAGES[:-1]}, "report": "would run"}, plan


@pytest.mark.xfail(strict=True, reason=(
    "--emit slurm: a training job runs the training script directly, so no process records the "
    "training stages in pipeline_state.json (only the --stage jobs: refine, evaluate, report do)"))
def test_pipeline_state_records_every_stage_of_the_chain(chain):
    state = json.loads((chain["out"] / "pipeline_state.json").read_text())["stages"]
    assert {sid: state.get(sid, {}).get("state") for sid in STAGES} == {sid: "done" for sid in STAGES}


# ---------------------------------------------------------------------------------------------
# A failed job


FAIL_SETUP = ['case "$SLURM_JOB_NAME" in *-linear) echo "injected failure of the baseline job" >&2; exit 3;; esac']


@pytest.fixture(scope="module")
def broken(cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("broken")
    recipe = _recipe(d / "recipe.yaml", "slurm-broken", setup=FAIL_SETUP)
    out = d / "out"
    res = _submit(cluster, recipe, out)
    print(f"\nslurm failing chain: {res['wall']:.0f}s")
    return {"recipe": recipe, "out": out, **res}


def test_failed_job_blocks_only_its_dependents(broken):
    out, ids, records, info = broken["out"], broken["ids"], broken["records"], broken["info"]
    logs = out / "slurm" / "logs"
    base = records[f"{SIZE}/linear"]
    assert base["JobState"] == "FAILED" and base["ExitCode"] == "3:0", base
    assert "injected failure" in "".join(p.read_text() for p in logs.glob(f"*-{ids[f'{SIZE}/linear']}.out"))
    # Everything downstream of the baseline never ran: cancelled before it got a node, no log.
    for sid in (f"{SIZE}/refine", f"{SIZE}/refined", f"{SIZE}/evaluate", "report"):
        assert records[sid]["JobState"] == "CANCELLED" and records[sid]["NodeList"] == "(null)", (sid, records[sid])
        assert info[sid].get("Reason") == "DependencyNeverSatisfied", (sid, info[sid])
        assert not list(logs.glob(f"*-{ids[sid]}.out")), sid
    # The control run does not depend on the baseline: it finished.
    assert records[f"{SIZE}/cosine"]["JobState"] == "COMPLETED"
    assert (out / SIZE / "cosine" / "summary.json").is_file()
    for path in (out / SIZE / "linear" / "summary.json", out / SIZE / "refined_schedule.json",
                 out / SIZE / "refined" / "summary.json", out / SIZE / "cosine" / "eval.json", out / "report.md"):
        assert not path.exists(), path
    # What the pipeline sees on disk afterwards: the control is done, the rest is still to run.
    plan = _dry_run(broken["recipe"], out)
    assert plan == {**{sid: "would run" for sid in STAGES}, f"{SIZE}/cosine": "would skip"}, plan


@pytest.mark.xfail(strict=True, reason=(
    "--emit slurm: a failed training job leaves no trace in pipeline_state.json, and the report job "
    "(afterok on everything) is cancelled, although in-process the report covers what finished"))
def test_pipeline_state_and_report_show_the_failure(broken):
    out = broken["out"]
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert state[f"{SIZE}/linear"]["state"] == "failed"
    for sid in (f"{SIZE}/refine", f"{SIZE}/refined", f"{SIZE}/evaluate"):
        assert state[sid]["state"] == "blocked"
    assert state[f"{SIZE}/cosine"]["state"] == "done"
    assert (out / "report.md").is_file()
