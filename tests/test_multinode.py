"""Multi-node pretraining with two "nodes" on one machine (loopback), checked against one process.

- ``torchrun --nnodes 2 --node_rank 0|1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT``, two
  agents × 2 ranks (world 4, micro batch 2);
- ``accelerate launch --config_file launch/multinode_cpu.yaml --num_machines 2 --machine_rank 0|1
  --main_process_ip 127.0.0.1``, two launchers × 1 rank (world 2);
- ``launch/slurm.sh`` itself, submitted with ``sbatch --nodes=2`` to a local two-node Slurm cluster
  (`_cluster_slurm`; skipped with the reason when Slurm is not installed): one ``accelerate launch``
  per node through ``srun``, ranks from ``SLURM_NODEID``;
- the training job ``llm-refine pipeline --emit slurm`` writes for ``slurm.nodes: 2`` with
  ``launch/multinode_cpu.yaml``, on the same cluster.

Each run must really be what it claims (the Trainer's accelerator is MULTI_CPU DDP with the world
size of both nodes, the model is wrapped in DistributedDataParallel, the history's meta says
``ddp`` and that world size) and the recorder's per-step ℓ1/ℓ2 must equal those of a single-process
run of the same config (same global batch of 8 sequences, split over the ranks) to fp32 rounding:
measured ≤ 3e-8 relative, asserted at 1e-5. ``launch/ddp_cpu.yaml`` starts its 2 processes, where
the same file with accelerate's ``MULTI_CPU`` type starts one process that trains alone.

Timing (2-core machine at load ≈ 7): reference ≈ 40 s, torchrun ≈ 75 s, accelerate ≈ 60 s,
slurm.sh ≈ 85 s, the pipeline's 2-node job + report ≈ 80 s (every process pays ~10-15 s of imports).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

from _cluster_slurm import cluster_fixture, free_port
from _pretrain_common import REPO, history_records

pytestmark = [pytest.mark.distributed, pytest.mark.cluster]

STEPS = 6
SETS = [f"train.max_steps={STEPS}", "train.eval_every=3", "train.save_every=3", "train.print_every=0",
        "data.val_sequences=8", "train.batch_size=8"]
CONFIG = str(REPO / "recipes" / "pretrain_tiny.yaml")
TIMEOUT = 420  # seconds for one multi-process run


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run_pair(cmds: list[list[str]], timeout: int = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Start every command at once (one per "node"), wait for all; kill them all on a timeout."""
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in cmds]
    deadline = time.monotonic() + timeout
    done = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=10)
        pytest.fail(f"multi-node run did not finish in {timeout}s: {cmds}")
    for r in done:
        assert r.returncode == 0, f"{r.args}\n{r.stdout[-6000:]}"
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same config: the history every multi-node run must reproduce (it also fills the data cache)."""
    out = tmp_path_factory.mktemp("single") / "run"
    p = subprocess.run([sys.executable, "-m", "llm_refine.train", CONFIG, "--output_dir", str(out), "--set", *SETS],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"]["world_size"] == 1
    return history_records(out / "gradnorms.jsonl")


def _check(out, reference, world: int) -> None:
    summary = json.loads((out / "summary.json").read_text())
    eng = summary["engine"]
    assert eng["distributed_type"] == "MULTI_CPU" and eng["world_size"] == world, eng
    assert eng["model_class"] == "DistributedDataParallel", eng
    runtime = json.loads((out / "run_config.json").read_text())["runtime"]
    assert runtime["world_size"] == world and runtime["micro_batch_size"] == 8 // world
    assert runtime["gradient_accumulation_steps"] == 1
    lines = (out / "gradnorms.jsonl").read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    assert meta["engine"] == "ddp" and meta["world_size"] == world, meta
    hist = history_records(out / "gradnorms.jsonl")
    # One record per step, written once (by global rank 0, not once per node).
    assert len(lines) == STEPS + 1 and [r["step"] for r in hist] == list(range(STEPS))
    assert summary["steps"] == STEPS and summary["tokens_seen"] == STEPS * 8 * 128
    for key in ("l1", "l2"):
        assert [r[key] for r in hist] == pytest.approx([r[key] for r in reference], rel=1e-5), key


def test_torchrun_two_nodes_c10d_rendezvous(reference, tmp_path):
    out = tmp_path / "torchrun"
    port = free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", f"llm-refine-test-{port}", "-m", "llm_refine.train", CONFIG, "--output_dir", str(out),
             "--set", *SETS] for rank in (0, 1)]
    _run_pair(cmds)
    _check(out, reference, world=4)


def test_accelerate_launch_two_machines(reference, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg_path = REPO / "launch" / "multinode_cpu.yaml"
    cfg = load_config_from_file(str(cfg_path))
    assert str(cfg.distributed_type).endswith("MULTI_GPU") and cfg.use_cpu is True
    assert cfg.num_machines == 2 and cfg.num_processes == 2 and cfg.mixed_precision == "no"
    out = tmp_path / "accelerate"
    port = free_port()
    cmds = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg_path),
             "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), "-m", "llm_refine.train", CONFIG, "--output_dir", str(out),
             "--set", *SETS] for rank in (0, 1)]
    _run_pair(cmds)
    _check(out, reference, world=2)


def test_ddp_cpu_config_is_the_cpu_twin_of_ddp(tmp_path):
    """launch/ddp_cpu.yaml starts its 2 processes; the same file with accelerate's MULTI_CPU type starts one."""
    from accelerate.commands.config.config_args import load_config_from_file

    cpu_path = REPO / "launch" / "ddp_cpu.yaml"
    cpu = load_config_from_file(str(cpu_path))
    gpu = load_config_from_file(str(REPO / "launch" / "ddp.yaml"))
    assert cpu.distributed_type == gpu.distributed_type and str(cpu.distributed_type).endswith("MULTI_GPU")
    assert cpu.use_cpu is True and cpu.mixed_precision == "no" and cpu.num_machines == 1 and cpu.num_processes == 2

    script = tmp_path / "who.py"
    # One os.write per line: two processes share the pipe, and print's separate writes of its
    # arguments interleave ("processprocess 0 of 2" was seen in CI).
    script.write_text('import os\nos.write(1, f"process {os.environ.get(\'RANK\', \'-\')} of '
                      '{os.environ.get(\'WORLD_SIZE\', \'-\')}\\n".encode())\n')
    multi_cpu = tmp_path / "multi_cpu.yaml"
    multi_cpu.write_text(yaml.safe_dump({**yaml.safe_load(cpu_path.read_text()), "distributed_type": "MULTI_CPU"}))
    seen = {}
    for name, cfg in (("ddp_cpu", cpu_path), ("multi_cpu", multi_cpu)):
        p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
                            "--main_process_port", str(free_port()), str(script)],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        seen[name] = sorted(line for line in p.stdout.splitlines() if line.startswith("process"))
    assert seen["ddp_cpu"] == ["process 0 of 2", "process 1 of 2"]
    assert seen["multi_cpu"] == ["process - of -"]  # one process, alone: the trap ddp_cpu.yaml avoids


cluster = cluster_fixture()


def test_slurm_sh_on_two_slurm_nodes(reference, cluster, tmp_path):
    out = tmp_path / "slurm"
    log = tmp_path / "slurm-job.out"
    env = {"ACCEL_CONFIG": "launch/multinode_cpu.yaml", "GPUS_PER_NODE": "1", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(free_port())}
    if not _resolves(cluster.nodes[0]):
        env["MASTER_ADDR"] = "127.0.0.1"  # slurm.sh's default is the first node's name
    p = cluster.run(["sbatch", "--parsable", "--nodes=2", f"--output={log}", "launch/slurm.sh", "recipes/pretrain_tiny.yaml",
                     "--output_dir", str(out), "--set", *SETS], cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr
    job = int(p.stdout.strip().split(";")[0])
    cluster.wait_queue_empty(TIMEOUT)
    rec = cluster.final_states()[job]
    text = log.read_text() if log.exists() else ""
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec, text[-6000:])
    _check_nodes(cluster, rec)
    _check(out, reference, world=2)


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def _check_nodes(cluster, rec) -> None:
    assert rec["NodeCnt"] == "2"
    assert cluster.run(["scontrol", "show", "hostnames", rec["NodeList"]]).stdout.split() == cluster.nodes


def test_pipeline_multinode_training_job_on_two_slurm_nodes(reference, cluster, tmp_path):
    """A training job of `--emit slurm` with slurm.nodes: 2 and launch/multinode_cpu.yaml: one
    accelerate launcher per node through srun; the same run as the reference, so the same norms."""
    if not _resolves(cluster.nodes[0]):
        pytest.skip(f"the emitted job's rendezvous address is the first node's name, {cluster.nodes[0]!r}, which does not resolve here")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "multinode", "sizes": ["cpu-0.5m"], "schedules": ["linear"], "seeds": [0], "evaluate": False,
        "schedule": {"warmup_steps": 30},  # = recipes/pretrain_tiny.yaml's, so the run is the reference's
        "pretrain": {
            "data": {"source": "embedded", "seq_len": 128, "vocab_size": 2048, "val_sequences": 8},
            "train": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 0.003, "weight_decay": 0.1,
                      "max_grad_norm": 1.0, "eval_every": 3, "save_every": 3, "log_every": 1, "print_every": 0},
        },
        "launch": {"launcher": "accelerate", "config": "launch/multinode_cpu.yaml"},
        "slurm": {"nodes": 2, "port": free_port()},
    }))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "llm_refine.cli", "pipeline", str(recipe), "--out", str(out), "--emit", "slurm"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    sub = cluster.run(["bash", str(out / "slurm" / "submit.sh")], cwd=REPO, env={"OMP_NUM_THREADS": "1"})
    assert sub.returncode == 0, sub.stdout + sub.stderr
    ids = {k: int(v) for k, v in re.findall(r"^(\S+): job (\d+)$", sub.stdout, re.M)}
    cluster.wait_queue_empty(TIMEOUT)
    states = cluster.final_states()
    rec = states[ids["cpu-0.5m/linear"]]
    logs = "".join(f.read_text()[-4000:] for f in (out / "slurm" / "logs").glob("*.out"))
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec, logs)
    _check_nodes(cluster, rec)
    _check(out / "cpu-0.5m" / "linear", reference, world=2)
    assert states[ids["report"]]["JobState"] == "COMPLETED" and (out / "report.md").is_file()
