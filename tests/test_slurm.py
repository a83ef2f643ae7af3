"""`llm-refine pipeline --emit slurm` on a real (local, single-machine) Slurm cluster.

A cluster of two slurmd "nodes" on loopback (`_cluster_slurm.SlurmCluster`; skipped with the reason
when Slurm is not installed or we are not root) runs the emitted ``submit.sh`` for a one-size
recipe (cpu-0.5m, 20 steps, linear → refine → refined, cosine, evaluate, report):

- the whole chain: every job COMPLETED in dependency order, every stage's output on disk, the
  report written, and the pipeline itself (``--dry-run`` afterwards) sees every stage finished;
- a failed job (the baseline training, made to fail by a ``slurm.setup`` line): its dependents
  never run (``afterok`` → ``DependencyNeverSatisfied``, cancelled by ``kill_invalid_depend``), the
  unrelated control run still finishes, and the pipeline sees exactly what is left to do.

The state of a chain: every job records its stage in ``pipeline_state.json`` (training jobs with
``--job-start`` and their EXIT trap, the others as ``--stage`` runs), and the report job, submitted
``afterany``, settles every stage from disk first — so after the failing chain the state says
failed / blocked / done and ``report.md`` covers what finished and lists what did not. The chain
starts with a one-node ``prepare`` job (``python -m llm_refine.train CONFIG --prepare-only``).

A multi-node training job's rendezvous (``MASTER_ADDR`` / ``MASTER_PORT``: the allocation's first
node and ``slurm.port`` unless set at submission) on two nodes, with a stub ``accelerate`` that
records what each node's launcher got (the real 2-node training is in test_multinode.py).

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
JOBS = ["prepare", *STAGES]  # what submit.sh submits: the data preparation, then one job per stage


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
    assert list(ids) == JOBS, sub.stdout
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
    for sid in JOBS:
        rec = records[sid]
        log = "\n".join(p.read_text()[-2000:] for p in logs.glob(f"*-{ids[sid]}.out"))
        assert rec.get("JobState") == "COMPLETED" and rec.get("ExitCode") == "0:0", (sid, rec, log)
        assert rec["NodeList"] in chain["nodes"]
    # Dependencies held: nothing started before what it needs had ended.
    start = {sid: records[sid]["StartTime"] for sid in JOBS}
    end = {sid: records[sid]["EndTime"] for sid in JOBS}
    for sid, needs in [(f"{SIZE}/linear", ["prepare"]), (f"{SIZE}/cosine", ["prepare"]),
                       (f"{SIZE}/refine", [f"{SIZE}/linear"]), (f"{SIZE}/refined", [f"{SIZE}/refine"]),
                       (f"{SIZE}/evaluate", [f"{SIZE}/linear", f"{SIZE}/refined", f"{SIZE}/cosine"]),
                       ("report", JOBS[:-1])]:
        assert all(start[sid] >= end[n] for n in needs), (sid, start, end)
    # The preparation job packed the data once (its --prepare-only line), on one node.
    prep_log = "".join(p.read_text() for p in logs.glob(f"*-{ids['prepare']}.out"))
    assert '"train_sequences"' in prep_log and records["prepare"]["NodeCnt"] == "1", prep_log[-2000:]

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


def test_pipeline_state_records_every_stage_of_the_chain(chain):
    state = json.loads((chain["out"] / "pipeline_state.json").read_text())["stages"]
    assert {sid: state.get(sid, {}).get("state") for sid in STAGES} == {sid: "done" for sid in STAGES}
    # each entry was written by its own job (the one Slurm ran); the training jobs' exit traps
    # recorded exit 0 (a --stage job records its own end)
    for sid in STAGES:
        assert state[sid]["slurm_job"] == str(chain["ids"][sid]), (sid, state[sid])
    for label in TRAIN:
        e = state[f"{SIZE}/{label}"]
        assert e["exit_code"] == 0, e
        assert e["started"] <= e["finished"] and e["wall_s"] > 0 and "error" not in e, e
    assert "did not finish" not in (chain["out"] / "report.md").read_text()


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
    for sid in (f"{SIZE}/refine", f"{SIZE}/refined", f"{SIZE}/evaluate"):
        assert records[sid]["JobState"] == "CANCELLED" and records[sid]["NodeList"] == "(null)", (sid, records[sid])
        assert info[sid].get("Reason") == "DependencyNeverSatisfied", (sid, info[sid])
        assert not list(logs.glob(f"*-{ids[sid]}.out")), sid
    # The control run does not depend on the baseline: it finished; so did the report (afterany).
    assert records[f"{SIZE}/cosine"]["JobState"] == "COMPLETED"
    assert records["report"]["JobState"] == "COMPLETED" and records["report"]["ExitCode"] == "0:0", records["report"]
    assert (out / SIZE / "cosine" / "summary.json").is_file()
    for path in (out / SIZE / "linear" / "summary.json", out / SIZE / "refined_schedule.json",
                 out / SIZE / "refined" / "summary.json", out / SIZE / "cosine" / "eval.json"):
        assert not path.exists(), path
    # What the pipeline sees on disk afterwards: the control is done, the rest is still to run.
    plan = _dry_run(broken["recipe"], out)
    assert plan == {**{sid: "would run" for sid in STAGES}, f"{SIZE}/cosine": "would skip"}, plan


def test_pipeline_state_and_report_show_the_failure(broken):
    out, ids = broken["out"], broken["ids"]
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    base = state[f"{SIZE}/linear"]
    # The failed job's own EXIT trap recorded it (the failure was a setup line, before any training).
    assert base["state"] == "failed" and base["exit_code"] == 3 and base["slurm_job"] == str(ids[f"{SIZE}/linear"]), base
    assert f"exited with code 3; log: {out / 'slurm' / 'logs'}" in base["error"]
    assert (out / "slurm" / "status" / f"{SIZE}-linear.exit").read_text().split() == ["3", str(ids[f"{SIZE}/linear"])]
    # The cancelled jobs never ran: the report job found them blocked (not pending / emitted).
    assert state[f"{SIZE}/refine"] == {**state[f"{SIZE}/refine"], "state": "blocked", "blocked_by": [f"{SIZE}/linear"]}
    assert state[f"{SIZE}/refined"]["state"] == "blocked" and state[f"{SIZE}/refined"]["blocked_by"] == [f"{SIZE}/refine"]
    assert state[f"{SIZE}/evaluate"]["state"] == "blocked"
    assert state[f"{SIZE}/cosine"]["state"] == "done" and state["report"]["state"] == "done"
    report = (out / "report.md").read_text()
    assert "| cpu-0.5m | " in report and "cosine" in report  # it covers what finished
    assert "## Stages that did not finish" in report
    assert f"| `{SIZE}/linear` | failed |" in report and f"| `{SIZE}/refine` | blocked | (needs {SIZE}/linear) |" in report
    log = "".join(p.read_text() for p in (out / "slurm" / "logs").glob(f"*-{ids['report']}.out"))
    assert f"{SIZE}/refined" in log and "blocked" in log and "1 failed" in log, log[-3000:]


# ---------------------------------------------------------------------------------------------
# A multi-node training job's rendezvous


def test_multinode_job_rendezvous_defaults_and_override(cluster, tmp_path):
    """The emitted 2-node training job, twice, with a stub ``accelerate`` on PATH that writes what
    each node's launcher got: by default the rendezvous is the allocation's first node and the
    recipe's port; ``MASTER_ADDR`` / ``MASTER_PORT`` set at submission win. The job then exits 0
    without a summary, which its EXIT trap records as a failure."""
    import os

    port = 31234
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "rdzv", "sizes": [SIZE], "schedules": ["linear"], "seeds": [0], "evaluate": False,
        "pretrain": {"data": {"source": "embedded", "seq_len": 64, "vocab_size": 2048, "val_sequences": 8},
                     "train": {"max_steps": 4, "batch_size": 8}},
        "launch": {"launcher": "accelerate", "config": "launch/multinode_cpu.yaml"},
        "slurm": {"nodes": 2, "port": port},
    }))
    out = tmp_path / "out"
    _pipeline(str(recipe), "--out", str(out), "--emit", "slurm")
    script = out / "slurm" / f"01-{SIZE}-linear.sbatch"
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "accelerate").write_text('#!/bin/bash\necho "$SLURMD_NODENAME $*" > "$STUB_OUT/node-$SLURM_NODEID"\n')
    (stub / "accelerate").chmod(0o755)
    cases = {"default": {}, "override": {"MASTER_ADDR": "10.11.12.13", "MASTER_PORT": "4242"}}
    jobs = {}
    for case, extra in cases.items():
        (tmp_path / case).mkdir()
        env = {"PATH": f"{stub}:{os.environ['PATH']}", "STUB_OUT": str(tmp_path / case), **extra}
        p = cluster.run(["sbatch", "--parsable", str(script)], cwd=REPO, env=env)
        assert p.returncode == 0, p.stderr
        jobs[case] = int(p.stdout.strip().split(";")[0])
        cluster.wait_queue_empty(180)
    states = cluster.final_states()
    expect = {"default": (cluster.nodes[0], str(port)), "override": ("10.11.12.13", "4242")}
    for case, (addr, mport) in expect.items():
        assert states[jobs[case]]["JobState"] == "COMPLETED", states[jobs[case]]
        if case == "default" and "MASTER_ADDR" in os.environ:
            continue  # this environment overrides it already
        for rank, node in enumerate(cluster.nodes):
            got = (tmp_path / case / f"node-{rank}").read_text().split()
            assert got[0] == node, (case, got)
            opts = dict(zip(got[2::2], got[3::2]))  # after "<node> launch": --key value pairs
            assert opts["--num_machines"] == "2" and opts["--machine_rank"] == str(rank), (case, got)
            assert (opts["--main_process_ip"], opts["--main_process_port"]) == (addr, mport), (case, got)
            assert got[-1] == str(out / SIZE / "linear" / "run_config.json"), got
    entry = json.loads((out / "pipeline_state.json").read_text())["stages"][f"{SIZE}/linear"]
    assert entry["state"] == "failed" and entry["slurm_job"] == str(jobs["override"]), entry
    assert "exited 0 but left no finished result" in entry["error"], entry
