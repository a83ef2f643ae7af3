#!/usr/bin/env bash
# CI: Debian's slurm-wlm and munge, for tests/test_slurm.py and tests/test_multinode.py. Those tests
# start their own single-machine cluster on loopback (tests/_cluster_slurm.py: a private munged,
# slurmctld and two slurmd as root) and skip, with the reason, when these packages are missing.
# Already installed: nothing to do. Not root or no apt-get: says so and leaves the tests to skip.
# Root with apt-get: installs them, and a failed install fails CI (the tests must not silently skip).
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin
have() { command -v "$1" >/dev/null 2>&1; }
if have munged && have slurmctld && have slurmd && have sbatch && have srun; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! have apt-get; then
  echo "CI: slurm-wlm/munge not installed and cannot be (needs root and apt-get): the Slurm tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurm-wlm munge >/dev/null
have munged && have slurmctld && have slurmd && have sbatch
