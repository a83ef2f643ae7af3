"""Packaging: the metadata says the truth (version in one place, LICENSE, py.typed, extras, the
minimum-versions constraints equal the declared floors), the version-warning helper, and — marked
``packaging``, run by .ci/run — a core install into a fresh venv without torch that refines.

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


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def core_venv(request, tmp_path_factory):
    if "packaging" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow (a fresh venv and pip installs): selected only by `-m packaging`, "
                    "e.g. python -m pytest -m packaging tests/test_packaging.py (.ci/run runs it)")
    base = tmp_path_factory.mktemp("core")
    # install from a copy: building in the working tree would write build/ and *.egg-info there
    src = base / "src"
    src.mkdir()
    for name in CORE_FILES:
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "llm_refine", src / "llm_refine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
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
