#!/usr/bin/env bash
# Minimum-versions job: a fresh venv with torch==2.13.0 (the CPU wheel on local disk) FIRST, then the
# project's [test,deepspeed] extras resolved under .ci/min-constraints.txt, which pins every declared
# lower bound exactly (and torch, so pip can never pull another, multi-GB CUDA build: it fails with
# ResolutionImpossible instead). Then the non-distributed tests, plus the distributed DeepSpeed
# recorder tests (2 gloo processes) because they are what exercise the patched DeepSpeed internals.
# Both test runs always run; the exit status is the first failing one's. .ci/run runs this (fresh
# temp venv); the measured time is in CHANGELOG.md.
#
#   .ci/min_versions.sh                 # venv in a temp dir, removed at the end
#   MIN_VENV=/tmp/minenv .ci/min_versions.sh   # reuse / keep a venv
#   .ci/min_versions.sh -m 'not packaging' tests/test_pretrain.py   # pytest arguments instead of the default
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
CONSTRAINTS="$REPO/.ci/min-constraints.txt"

t0=$(date +%s)
phase() { echo "min_versions: [$(( $(date +%s) - t0 )) s] $*"; }
work=$(mktemp -d "${TMPDIR:-/tmp}/llm-refine-min.XXXXXX")
trap 'rm -rf "$work"' EXIT
VENV=${MIN_VENV:-$work/venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pipi() { "$PY" -m pip install -q -c "$CONSTRAINTS" "$@"; }

die_torch() {
  echo "min_versions: FAILED — pip would install a torch other than 2.13.0 (or none). Fix the pins in" >&2
  echo "  .ci/min-constraints.txt / pyproject.toml; never let pip resolve another torch." >&2
  exit 1
}
check_torch() {
  "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" || die_torch
}

# 1. torch first, nothing else
phase "venv $VENV: torch==2.13.0"
pipi "torch==2.13.0" || die_torch
check_torch
pipi "setuptools>=61" wheel packaging numpy psutil py-cpuinfo  # what building the deepspeed sdist imports

phase "deepspeed (sdist build)"
# 2. deepspeed is an sdist: build it against the torch already installed (no isolated build env)
pipi --no-build-isolation "deepspeed==$(sed -n 's/^deepspeed==\([^ ]*\).*/\1/p' "$CONSTRAINTS")"
check_torch

# 3. the project from a copy (building in the shared tree would write build/ and *.egg-info there),
#    with every extra the tests need, under the minimum pins. --dry-run first: fail loudly, before
#    installing anything, if the resolution contains a torch other than 2.13.0.
#    The copy is the whole working tree minus what git ignores (pyproject.toml maps recipes/ and
#    launch/ into the wheel, so copying llm_refine/ alone does not build); outside git, all but .git.
src="$work/src"
mkdir -p "$src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z -co --exclude-standard | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _ \
    | tar -c --null -T - -f - | tar -x -C "$src" -f -
else
  tar -c --exclude=.git -f - . | tar -x -C "$src" -f -
fi
phase "the project [test,deepspeed]: resolve (--dry-run), check torch, install"
"$PY" -m pip install -q -c "$CONSTRAINTS" --dry-run --report "$work/report.json" "$src[test,deepspeed]"
"$PY" - "$work/report.json" <<'EOF' || die_torch
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    md = item["metadata"]
    if md["name"].lower() == "torch" and md["version"].split("+")[0] != "2.13.0":
        print("min_versions: the resolution has torch", md["version"], file=sys.stderr)
        sys.exit(1)
EOF
pipi "$src[test,deepspeed]"
check_torch

echo "min_versions: installed in $(( $(date +%s) - t0 )) s:"
"$PY" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|datasets|deepspeed|tokenizers|huggingface.hub|safetensors|sentencepiece|pyarrow|tqdm|numpy|scipy) ' | sed 's/^/  /'
# the installed versions must BE the pins (a constraint only caps what pip may pick)
"$PY" - "$CONSTRAINTS" <<'EOF'
import re, sys
from importlib.metadata import version
bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, want = (s.strip() for s in line.split("=="))
        have = version(name).split("+")[0]
        if have != want:
            bad.append(f"{name} {have} (pinned {want})")
if bad:
    sys.exit("min_versions: not the minimum versions: " + ", ".join(bad))
EOF

# 4. the tests, against the working tree (PYTHONPATH), from the repo root
t1=$(date +%s)
set +e
if [ "$#" -gt 0 ]; then  # the arguments go to pytest as they are
  PYTHONPATH="$REPO" "$PY" -m pytest -q -p no:cacheprovider "$@"
  rc=$?
else
  phase "tests: -m 'not distributed and not packaging' tests"
  PYTHONPATH="$REPO" "$PY" -m pytest -q -p no:cacheprovider -m "not distributed and not packaging" tests
  rc=$?
  phase "tests: -m distributed tests/test_recorder_deepspeed.py (2 gloo processes)"
  PYTHONPATH="$REPO" "$PY" -m pytest -q -p no:cacheprovider -m distributed tests/test_recorder_deepspeed.py
  rc2=$?
  [ "$rc" -ne 0 ] || rc=$rc2
fi
set -e
echo "min_versions: tests took $(( $(date +%s) - t1 )) s, total $(( $(date +%s) - t0 )) s (rc=$rc)"
if [ "$rc" -eq 5 ]; then
  echo "min_versions: pytest collected no tests (exit 5) — treating as a failure" >&2
  exit 1
fi
exit "$rc"
