"""A real Slurm cluster on this one machine, on loopback, for the tests (Debian: ``apt-get install
slurm-wlm munge``).

`SlurmCluster` writes a ``slurm.conf`` into a temporary directory, starts a private ``munged``
(its own key and socket), ``slurmctld`` and one ``slurmd`` per node (two by default) as root on
free loopback ports, waits until ``sinfo`` shows every node idle, and at the end cancels the jobs
and stops exactly the daemons it started. Client commands get ``SLURM_CONF`` pointing at the file
(`SlurmCluster.env`; sbatch passes the caller's environment on to the jobs). Nothing outside the
temporary directories is written, so several clusters (other test sessions) can run side by side.
Start ≈ 1 s; a job reaches a node 1-3 s after its dependencies end.

Finished jobs are appended by ``jobcomp/filetxt`` to ``<root>/jobcomp.txt`` (one line per job with
its final ``JobState``), which is what `SlurmCluster.final_states` reads: with no accounting
database, ``sacct`` has nothing, and ``scontrol show job`` forgets a job after ``MinJobAge``.
``DependencyParameters=kill_invalid_depend`` cancels a job whose ``afterok`` dependency failed
(instead of leaving it pending forever with ``DependencyNeverSatisfied``), so a chain always drains.

`slurm_missing()` says why a cluster cannot run here (not installed, not root), for ``pytest.skip``.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
START_TIMEOUT = 60


def slurm_missing() -> str | None:
    """Why a local Slurm cluster cannot run here, or None when it can."""
    missing = [n for n in (*DAEMONS, *CLIENTS) if shutil.which(n) is None and not Path("/usr/sbin", n).exists()]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not found; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs slurmd as root; these tests need root"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_node_names(n: int) -> list[str]:
    """``<host>, <host>-2, ...`` when this machine's name resolves (so the first node's name, which
    job scripts take as the rendezvous address, reaches 127.0.0.1 or this host), else ``n1 .. nN``.
    (``localhost`` cannot be a node name: Slurm maps it to the real host name.)"""
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return [f"n{i + 1}" for i in range(n)]
    return [host] + [f"{host}-{i + 1}" for i in range(1, n)]


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """One slurmctld and ``nodes`` slurmd daemons on this machine: nodes `default_node_names`
    (``<host>``, ``<host>-2``), all at 127.0.0.1 (each slurmd on its own port, spool dir and log),
    ``cpus_per_node`` CPUs each (default: the machine's CPUs split between them), one partition
    ``debug``. Debian's build runs several slurmd on one host, so ``srun -N2`` really starts one
    task in each of two "nodes" (``SLURM_NODEID`` 0 and 1), and a job script's rendezvous address
    (the first node's name) resolves.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, nodes: int | list[str] = 2,
                 cpus_per_node: int | None = None):
        self._own_root = root is None  # a directory it made itself is removed by stop()
        self.root = Path(root or tempfile.mkdtemp(prefix="llm-refine-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.nodes = list(nodes) if isinstance(nodes, (list, tuple)) else default_node_names(nodes)
        self.cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // len(self.nodes))
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"
        # munged wants every directory above its socket searchable by all (pytest's tmp dirs are
        # 0700), so the socket lives in a directory of its own under the system temp dir.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="llm-refine-munge-"))
        self.sock = self.sock_dir / "munge.sock"
        self.procs: dict[str, subprocess.Popen] = {}
        self.pids: dict[str, int] = {}

    # -- configuration

    def _write_files(self) -> None:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        self.sock_dir.chmod(0o755)
        for d in ("state", "log", "run", *(f"spool-{n}" for n in self.nodes)):
            (r / d).mkdir(exist_ok=True)
            (r / d).chmod(0o755)
        key_dir = r / "munge-key"
        key_dir.mkdir(exist_ok=True)
        key_dir.chmod(0o700)
        key = key_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        mem_mb = 1024
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
            mem_mb = max(256, int(total * 0.8 / len(self.nodes)))
        except (ValueError, OSError):
            pass
        self.ctld_port = free_port()
        self.slurmd_ports = [free_port() for _ in self.nodes]
        lines = [
            f"ClusterName=llmrefine{os.getpid()}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.sock}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Cancel a job whose dependency can never be satisfied (an afterok on a failed job);
            # schedule often, so a chain of short jobs does not wait out the default intervals.
            "DependencyParameters=kill_invalid_depend",
            "SchedulerParameters=sched_interval=1,sched_min_interval=100000",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            *(f"NodeName={n} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
              f"RealMemory={mem_mb} State=UNKNOWN" for n, port in zip(self.nodes, self.slurmd_ports)),
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment with ``SLURM_CONF`` set (sbatch passes it on to the jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- daemons

    def start(self) -> "SlurmCluster":
        self._write_files()
        atexit.register(self.stop)  # also when the test session ends without its teardown
        r = self.root
        try:
            self._spawn("munged", [
                _which("munged"), "--foreground", f"--socket={self.sock}",
                f"--key-file={r / 'munge-key' / 'munge.key'}", f"--pid-file={r / 'run' / 'munged.pid'}",
                f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge-key' / 'munged.seed'}",
            ])
            self._wait(self.sock.exists, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"]) and "UP" in self.run(["scontrol", "ping"]).stdout,
                       "slurmctld answering `scontrol ping`")
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", n])
            self._wait(self._nodes_idle, f"nodes {','.join(self.nodes)} idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def _wait(self, cond, what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode} while waiting for {what}\n{self.logs()}")
            try:
                if cond():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def _ok(self, cmd: list[str]) -> bool:
        return self.run(cmd, timeout=10).returncode == 0

    def _nodes_idle(self) -> bool:
        p = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
        states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
        return p.returncode == 0 and sorted(states) == sorted(self.nodes) and all(
            v.rstrip("*") == "idle" for v in states.values())

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")[-tail:]
            if text.strip():
                parts.append(f"--- {f.name}\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started (slurmds, slurmctld, munged)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "-u", "root"], timeout=15)
            try:  # let slurmd signal and reap the jobs' processes before it goes
                self.wait_queue_empty(30)
            except SlurmError:
                pass
        for name in (*(f"slurmd-{n}" for n in self.nodes), "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- clients

    def run(self, cmd: list[str], *, timeout: float = 60, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(cmd, 124, e.stdout or "", f"timed out after {timeout}s")

    def sbatch(self, *args: str, cwd=None) -> int:
        p = self.run(["sbatch", "--parsable", *args], cwd=cwd)
        if p.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed: {p.stderr}\n{self.logs()}")
        return int(p.stdout.strip().split(";")[0])

    def queue(self) -> list[str]:
        """Job ids still in the queue (pending, running, completing)."""
        p = self.run(["squeue", "-h", "-o", "%i"], timeout=15)
        if p.returncode != 0:
            raise SlurmError(f"squeue failed: {p.stderr}")
        return p.stdout.split()

    def wait_queue_empty(self, timeout: float) -> float:
        """Wait until squeue lists no job; returns the seconds waited. SlurmError (with squeue's
        view and the logs) on timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.queue():
                return time.monotonic() - t0
            time.sleep(1.0)
        view = self.run(["squeue", "-o", "%i %j %T %r"]).stdout
        raise SlurmError(f"jobs still queued after {timeout:.0f}s:\n{view}\n{self.logs()}")

    def final_states(self) -> dict[int, dict[str, str]]:
        """job id -> the jobcomp record of every finished job (JobState, JobName, ExitCode, ...)."""
        out: dict[int, dict[str, str]] = {}
        if not self.jobcomp.exists():
            return out
        for line in self.jobcomp.read_text().splitlines():
            rec = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in rec:
                out[int(rec["JobId"])] = rec
        return out

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (kept for MinJobAge after the job ends)."""
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=15)
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout)) if p.returncode == 0 else {}


def _cluster_fixture(tmp_path_factory):
    """A two-node cluster for one test module (skipped with the reason when Slurm is missing)."""
    import pytest

    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    c.start()
    yield c
    c.stop()


def cluster_fixture():
    """``cluster = cluster_fixture()`` in a test module: the module-scoped ``cluster`` fixture."""
    import pytest

    return pytest.fixture(scope="module", name="cluster")(_cluster_fixture)
