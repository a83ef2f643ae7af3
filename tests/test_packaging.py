"""Packaging: the metadata says the truth (version in one place, LICENSE, py.typed, extras, the
minimum-versions constraints equal the declared floors), the version-warning helper, and — marked
``packaging``, run by .ci/run — a core install into a fresh venv without torch that refines, and
the wheel (built from the sdist) installed alone into a fresh venv and used from a directory
outside the checkout: `examples list/copy`, `pretrain`, `refine`, a `pipeline` through
`accelerate launch`, and `--emit slurm` scripts that name no checkout path.

The ``packaging`` test runs only when selected (``python -m pytest -m packaging``; otherwise it is
skipped with that reason): it builds a venv and pip-installs numpy/scipy/matplotlib/pyyaml and the
project, which needs a package index (skipped when pip cannot reach one); it took 356 s on the
project's 2-core machine while five other test runs shared it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import llm_refine
from llm_refine import _compat

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _floor(spec: str) -> tuple[str, str | None]:
    name = re.match(r"[A-Za-z0-9_.\-]+", spec).group(0).lower()
    m = re.search(r">=\s*([0-9][^,;\s]*)", spec)
    return name, (m.group(1) if m else None)


# ---------------------------------------------------------------------------------------------
# metadata


def test_version_in_one_place():
    proj = _pyproject()
    assert "version" not in proj["project"] and "version" in proj["project"]["dynamic"]
    assert proj["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llm_refine.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[a-z]+\d+)?", llm_refine.__version__)
    # nobody else writes it
    hits = [p for p in (REPO / "llm_refine").rglob("*.py")
            if re.search(r"^\s*__version__\s*=", p.read_text(), re.M)]
    assert hits == [REPO / "llm_refine" / "__init__.py"]
    assert f"## [{llm_refine.__version__}]" in (REPO / "CHANGELOG.md").read_text()


def test_license_py_typed_and_package_data():
    proj = _pyproject()
    text = (REPO / "LICENSE").read_text()
    assert proj["project"]["license"] == {"text": "MIT"}
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    assert (REPO / "llm_refine" / "py.typed").is_file()
    assert "py.typed" in proj["tool"]["setuptools"]["package-data"]["llm_refine"]


def test_core_dependencies_have_no_torch_and_extras_are_layered():
    proj = _pyproject()
    core = {_floor(d)[0] for d in proj["project"]["dependencies"]}
    assert core == {"numpy", "scipy", "pyyaml", "matplotlib"}
    extras = proj["project"]["optional-dependencies"]
    names = {k: {_floor(d)[0] for d in v} for k, v in extras.items()}
    assert {"torch", "transformers", "accelerate", "tqdm"} <= names["hf"]
    assert {"llm-refine", "datasets", "sentencepiece", "tokenizers", "pyarrow"} <= names["train"]
    assert "llm-refine[hf]" in extras["train"] and "llm-refine[hf]" in extras["deepspeed"]
    assert "llm-refine[train]" in extras["test"]
    # upper bounds where private internals are patched, equal to the runtime warning's
    for pkg in ("transformers", "accelerate", "deepspeed"):
        spec = next(d for v in extras.values() for d in v if _floor(d)[0] == pkg)
        assert f"<{_compat.TESTED_BELOW[pkg]}" in spec.replace(" ", ""), spec


def test_min_constraints_pin_exactly_the_declared_floors():
    proj = _pyproject()
    declared = {}
    for spec in [*proj["project"]["dependencies"], *sum(proj["project"]["optional-dependencies"].values(), [])]:
        name, floor = _floor(spec)
        if floor and name != "llm-refine":
            declared[name] = floor
    pins = {}
    for line in (REPO / ".ci" / "min-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, v = line.partition("==")
            pins[name.strip().lower()] = v.strip()
    for pkg in ("transformers", "accelerate", "datasets", "deepspeed", "tokenizers", "sentencepiece", "pyarrow", "tqdm"):
        assert pins.get(pkg) == declared[pkg], (pkg, pins.get(pkg), declared[pkg])
    assert pins["torch"] == "2.13.0"


def test_undeclared_imports_are_declared():
    """tqdm and pyarrow are imported by the package: they must be in an extra."""
    proj = _pyproject()
    declared = {_floor(d)[0] for v in proj["project"]["optional-dependencies"].values() for d in v}
    src = "\n".join(p.read_text() for p in (REPO / "llm_refine").rglob("*.py"))
    for mod, dist in (("tqdm", "tqdm"), ("pyarrow", "pyarrow"), ("sentencepiece", "sentencepiece"),
                      ("datasets", "datasets"), ("transformers", "transformers"), ("deepspeed", "deepspeed")):
        if re.search(rf"^\s*(?:import|from)\s+{mod}\b", src, re.M):
            assert dist in declared, mod


# ---------------------------------------------------------------------------------------------
# llm_refine._compat.warn_if_untested


@pytest.fixture
def fresh_compat(monkeypatch):
    monkeypatch.setattr(_compat, "_warned", set())
    return _compat


def test_release_parsing():
    assert _compat.release("5.23.0") == (5, 23, 0)
    assert _compat.release("0.19.8+cu121") == (0, 19, 8)
    assert _compat.release("6.0.0rc1") == (6, 0, 0)
    assert _compat.release("garbage") == ()


@pytest.mark.parametrize("pkg,ver,warns", [
    ("transformers", "5.24.0", False), ("transformers", "6.0.0", True), ("transformers", "6.0.0rc1", True),
    ("accelerate", "1.15.0", False), ("accelerate", "2.0", True),
    ("deepspeed", "0.19.8", False), ("deepspeed", "0.20.0", True), ("deepspeed", "1.0", True),
])
def test_warn_if_untested(fresh_compat, pkg, ver, warns):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        msg = fresh_compat.warn_if_untested(pkg, version=ver)
    assert (msg is not None) == warns
    assert len(w) == int(warns)
    if warns:
        assert w[0].category is RuntimeWarning
        assert pkg in msg and ver in msg and f"<{_compat.TESTED_BELOW[pkg]}" in msg


def test_warn_once_per_process_and_silent_when_missing(fresh_compat):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert fresh_compat.warn_if_untested("transformers", version="7.0") is not None
        assert fresh_compat.warn_if_untested("transformers", version="7.0") is None
        assert fresh_compat.warn_if_untested("no-such-package-llm-refine") is None
        assert fresh_compat.warn_if_untested("no-such-package-llm-refine", "1") is None
        assert fresh_compat.warn_if_untested("accelerate", version="not a version") is None
    assert len(w) == 1


def test_installed_versions_are_within_the_tested_range(fresh_compat):
    """The environment the suite runs in is a tested one (else the suite proves nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pkg in _compat.TESTED_BELOW:
            fresh_compat.warn_if_untested(pkg)


# ---------------------------------------------------------------------------------------------
# core install, without torch (slow: marked, run explicitly by .ci/run)

CORE_FILES = ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md")
SOURCE_DIRS = ("llm_refine", "recipes", "launch")  # the package and the example files it ships


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


def _copy_source(dest: Path) -> Path:
    """What a build reads, copied (building in the working tree would write build/ and *.egg-info there)."""
    dest.mkdir()
    for name in CORE_FILES:
        shutil.copy2(REPO / name, dest / name)
    for d in SOURCE_DIRS:
        shutil.copytree(REPO / d, dest / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _only_with_packaging_marker(request, what: str) -> None:
    """Skip unless the run selected `-m packaging` (these fixtures are slow)."""
    if "packaging" not in (request.config.getoption("markexpr") or ""):
        pytest.skip(f"slow ({what}): selected only by `-m packaging`, "
                    "e.g. python -m pytest -m packaging tests/test_packaging.py (.ci/run runs it)")


@pytest.fixture(scope="module")
def core_venv(request, tmp_path_factory):
    _only_with_packaging_marker(request, "a fresh venv and pip installs")
    base = tmp_path_factory.mktemp("core")
    src = _copy_source(base / "src")
    venv = base / "venv"
    r = _run([sys.executable, "-m", "venv", str(venv)])
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    probe = _run([str(py), "-m", "pip", "install", "--dry-run", "--no-deps", "-q",
                  "numpy", "scipy", "pyyaml", "matplotlib", "setuptools>=61"], env=env)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index from a fresh venv: {probe.stderr.strip()[-300:]}")
    # one resolution (slow): install and report what was installed; never torch nor any HF package
    # (test_core_dependencies_have_no_torch_and_extras_are_layered checks the metadata beforehand)
    report = base / "report.json"
    r = _run([str(py), "-m", "pip", "install", "-q", "--report", str(report), str(src)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    installed = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "llm-refine" in installed and {"numpy", "scipy", "matplotlib", "pyyaml"} <= installed, installed
    assert not installed & {"torch", "transformers", "accelerate", "datasets", "deepspeed", "sentencepiece"}, installed
    return venv, env


@pytest.mark.packaging
def test_core_install_imports_and_refines_without_torch(core_venv, tmp_path):
    venv, env = core_venv
    py, cli = venv / "bin" / "python", venv / "bin" / "llm-refine"
    r = _run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('transformers'))"], env=env)
    assert r.stdout.strip() == "None None", r.stdout + r.stderr
    code = ("import sys, llm_refine; from llm_refine import refine_schedule, make_schedule; "
            "import numpy as np; m = refine_schedule(np.linspace(2, 1, 200)); "
            "f = make_schedule({'name': 'cosine', 'warmup_ratio': 0.1}, total_steps=100); "
            "assert m.max() == 1 and m[-1] == 0 and 0 < f(50, 100) < 1; "
            "assert 'torch' not in sys.modules; print(llm_refine.__version__)")
    r = _run([str(py), "-c", code], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == llm_refine.__version__
    csv = tmp_path / "trace.csv"
    csv.write_text("step,value\n" + "".join(f"{i},{2.0 - i / 400:.6f}\n" for i in range(400)))
    for args in (["refine", str(csv), "--norm", "l1", "-o", str(tmp_path / "r.json")],
                 ["show", str(tmp_path / "r.json")],
                 ["plot", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.png")]):
        r = _run([str(cli), *args], env=env, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    assert (tmp_path / "r.json").stat().st_size > 0 and (tmp_path / "r.png").stat().st_size > 0
    # the installed copy, not the working tree, ran
    r = _run([str(py), "-c", "import llm_refine; print(llm_refine.__file__)"], env=env, cwd=tmp_path)
    assert str(venv) in r.stdout, r.stdout
    # the recorder needs the [hf] extra: a clear ImportError, not a silent half-import
    r = _run([str(py), "-c", "from llm_refine import GradNormCallback"], env=env, cwd=tmp_path)
    assert r.returncode != 0 and "No module named" in r.stderr


# ---------------------------------------------------------------------------------------------
# the wheel in a fresh venv, used from a directory outside the checkout (slow: marked, .ci/run)
#
# The venv sees the system site-packages (torch, transformers, accelerate: no download), where the
# checkout is installed editable: a meta-path finder that maps `llm_refine` to the working tree and
# would answer for any module the wheel lacks. The venv's sitecustomize.py drops that finder and
# any sys.path entry outside the venv holding an llm_refine directory, so only the wheel can load;
# every command then checks that llm_refine really came from the venv.

_GUARD = '''"""tests/test_packaging.py: only the wheel installed in this venv may provide llm_refine."""
import os
import sys

_venv = os.path.realpath(sys.prefix)


def _theirs(finder):
    mod = sys.modules.get(getattr(finder, "__module__", "") or "")
    return "llm_refine" in (getattr(mod, "MAPPING", None) or {})


def _outside(entry):
    path = os.path.realpath(entry or os.curdir)
    return not path.startswith(_venv + os.sep) and os.path.isdir(os.path.join(path, "llm_refine"))


sys.meta_path[:] = [f for f in sys.meta_path if not _theirs(f)]
sys.path[:] = [p for p in sys.path if not _outside(p)]
'''

_WHERE = """import json, sys, llm_refine, llm_refine.examples as e, llm_refine.train.__main__, llm_refine.pipeline
from llm_refine.fileio import sha256_file
print(json.dumps({"file": llm_refine.__file__, "root": str(e.assets_root()),
                  "modules": sorted({m.__file__ for n, m in sys.modules.items() if n.startswith("llm_refine") and getattr(m, "__file__", None)}),
                  "examples": {x.relpath: sha256_file(x.path) for x in e.list_examples()}}))
"""


def _inside(path, root) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _repo_examples() -> dict[str, str]:
    from llm_refine.examples import KINDS
    from llm_refine.fileio import sha256_file

    return {f"{sub}/{p.name}": sha256_file(p) for sub, pats in KINDS.values() for pat in pats for p in (REPO / sub).glob(pat)}


def _setuptools_release() -> tuple[int, ...]:
    """This environment's setuptools release, () when there is none (the build backend pyproject.toml names)."""
    from importlib import metadata

    try:
        return _compat.release(metadata.version("setuptools"))
    except metadata.PackageNotFoundError:
        return ()


@pytest.fixture(scope="module")
def wheel_venv(request, tmp_path_factory):
    """(venv, env): the wheel built from this tree, installed alone into a fresh venv."""
    import json
    import zipfile

    _only_with_packaging_marker(request, "builds the wheel, a venv, trains")
    base = tmp_path_factory.mktemp("wheel")
    assert not _inside(base, REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    src = _copy_source(base / "src")
    dist = base / "dist"
    # The sdist first, then the wheel from it (what pip builds from an sdist on an index): the sdist
    # must carry recipes/ and launch/ too. Without setuptools>=61 here, pip builds the wheel from
    # the tree in an isolated build environment (which needs the package index).
    if _setuptools_release() >= (61,):
        r = _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
                  str(dist)], cwd=src, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        build_from, isolation = dist / r.stdout.split()[-1], ["--no-build-isolation"]
    else:
        build_from, isolation = src, []
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist), str(build_from)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("llm_refine-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"llm_refine/_assets/recipes/tiny.yaml", "llm_refine/_assets/launch/single_cpu.yaml",
            "llm_refine/_assets/launch/slurm.sh", "llm_refine/py.typed", "llm_refine/train/__main__.py"} <= names
    venv = base / "venv"
    r = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], env=env)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    r = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env, cwd=base)
    site = Path(r.stdout.strip())
    assert _inside(site, venv), r.stdout + r.stderr
    (site / "sitecustomize.py").write_text(_GUARD)
    # pip from the system site, run by the venv's python, installs into the venv; --ignore-installed:
    # the editable install outside the venv is neither consulted nor uninstalled
    r = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], env=env, cwd=base)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (venv / "bin" / "llm-refine").is_file()
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               LLM_REFINE_CACHE=str(base / "cache"))
    r = _run([str(py), "-c", _WHERE], env=env, cwd=base)
    assert r.returncode == 0, r.stderr[-3000:]
    where = json.loads(r.stdout)
    assert _inside(where["file"], site), where["file"]
    assert all(_inside(f, site) for f in where["modules"]), [f for f in where["modules"] if not _inside(f, site)]
    assert Path(where["root"]) == site / "llm_refine" / "_assets"
    # the packaged copies are the repository's files, all of them and nothing else
    assert where["examples"] == _repo_examples()
    return venv, env


def _cli(venv, env, cwd, *args, timeout=900):
    assert not _inside(cwd, REPO)
    return subprocess.run([str(venv / "bin" / "llm-refine"), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def _ok(r):
    assert r.returncode == 0, (r.args, r.stdout[-3000:], r.stderr[-3000:])
    return r


@pytest.mark.packaging
def test_wheel_examples_list_and_copy(wheel_venv, tmp_path):
    venv, env = wheel_venv
    rows = _ok(_cli(venv, env, tmp_path, "examples", "list")).stdout.splitlines()[1:]
    names = {ln.split()[0]: ln.split()[1] for ln in rows}
    assert names == {Path(rel).stem: ("recipe" if rel.startswith("recipes/") else "launch") for rel in _repo_examples()}
    assert "llm-refine examples copy" in _ok(_cli(venv, env, tmp_path, "examples", "copy", "--help")).stdout
    _ok(_cli(venv, env, tmp_path, "examples", "copy", "pretrain_tiny"))
    assert (tmp_path / "pretrain_tiny.yaml").read_bytes() == (REPO / "recipes" / "pretrain_tiny.yaml").read_bytes()
    r = _cli(venv, env, tmp_path, "examples", "copy", "pretrain_tiny")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "llm-refine examples: error: pretrain_tiny.yaml: exists; pass --force to overwrite it"], r.stderr
    _ok(_cli(venv, env, tmp_path, "examples", "copy", "pretrain_tiny", "--force"))
    _ok(_cli(venv, env, tmp_path, "examples", "copy", "slurm", "launch/"))
    assert (tmp_path / "launch" / "slurm.sh").read_bytes() == (REPO / "launch" / "slurm.sh").read_bytes()
    assert os.access(tmp_path / "launch" / "slurm.sh", os.X_OK)


TINY = ["train.max_steps=8", "train.eval_every=8", "train.save_every=8", "train.print_every=0",
        "data.val_sequences=16", "schedule.warmup_steps=2"]


@pytest.mark.packaging
def test_wheel_pretrain_then_refine(wheel_venv, tmp_path):
    """`llm-refine pretrain` on the shipped tiny config (8 steps), then `llm-refine refine` on the
    history it recorded, from a directory outside the checkout."""
    import json

    venv, env = wheel_venv
    _ok(_cli(venv, env, tmp_path, "examples", "copy", "pretrain_tiny"))
    r = _ok(_cli(venv, env, tmp_path, "pretrain", "pretrain_tiny.yaml", "--output_dir", "run", "--set", *TINY))
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["final_val_loss"] > 0 and line["tokens_seen"] == 8 * 8 * 128
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["size"] == "cpu-0.5m"
    assert len([ln for ln in (tmp_path / "run" / "gradnorms.jsonl").read_text().splitlines() if '"step"' in ln]) == 8
    r = _cli(venv, env, tmp_path, "pretrain", "pretrain_tiny.yaml", "--set", "train.bogus=1")
    assert r.returncode == 2 and r.stderr.strip().startswith("llm-refine pretrain: error: pretrain_tiny.yaml: train.bogus"), r.stderr
    _ok(_cli(venv, env, tmp_path, "refine", "run/gradnorms.jsonl", "--norm", "l1", "-o", "refined.json"))
    art = json.loads((tmp_path / "refined.json").read_text())
    assert len(art["multipliers"]) == 8


PIPELINE_RECIPE = """\
name: wheel
sizes: [cpu-0.5m]
schedules: [linear, refined]
seeds: [0]
refine: {norm: l1, tau: 0.1}
schedule: {warmup_steps: 2}
evaluate: false  # the runs' own final validation loss is enough here
pretrain:
  data: {source: embedded, seq_len: 128, vocab_size: 2048, val_sequences: 16}  # as TINY: one data cache
  train: {max_steps: 8, batch_size: 8, learning_rate: 0.003, eval_every: 8, save_every: 8, print_every: 0}
"""


@pytest.mark.packaging
def test_wheel_pipeline_accelerate_and_slurm(wheel_venv, tmp_path):
    """A one-size pipeline (linear -> refine -> refined, 8 steps) through `accelerate launch` with
    the shipped launch/single_cpu.yaml, and the same recipe emitted as SLURM jobs that name no
    checkout path."""
    import json

    venv, env = wheel_venv
    (tmp_path / "r.yaml").write_text(PIPELINE_RECIPE)
    _ok(_cli(venv, env, tmp_path, "examples", "copy", "single_cpu", "launch/"))
    _ok(_cli(venv, env, tmp_path, "pipeline", "r.yaml", "--out", "pipe", "--launcher", "accelerate",
             "--launch-config", "launch/single_cpu.yaml"))
    summaries = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "pipe").rglob("summary.json")}
    assert {s["schedule"]["name"] for s in summaries.values()} == {"linear", "refined"}, summaries.keys()
    assert all(s["steps"] == 8 for s in summaries.values())
    assert (tmp_path / "pipe" / "report.md").is_file()
    _ok(_cli(venv, env, tmp_path, "pipeline", "r.yaml", "--out", "slurm-out", "--emit", "slurm", "--launcher", "accelerate",
             "--launch-config", "launch/single_cpu.yaml"))
    scripts = sorted((tmp_path / "slurm-out" / "slurm").glob("*.sbatch"))
    assert scripts and (tmp_path / "slurm-out" / "slurm" / "submit.sh").is_file()
    checkout = {str(REPO), os.path.realpath(REPO), "/work/main"}
    for f in [p for p in (tmp_path / "slurm-out").rglob("*") if p.is_file()]:
        text = f.read_text(errors="replace")
        assert not [c for c in checkout if c in text], (f, [c for c in checkout if c in text])
        assert "recipes/pretrain.py" not in text, f
    train_jobs = [p.read_text() for p in scripts if "accelerate launch" in p.read_text()]
    assert len(train_jobs) == 2 and all("-m llm_refine.train" in t for t in train_jobs)
