"""The shipped examples (recipes/*.yaml, launch/*.yaml, launch/*.sh) and `llm-refine examples`:
the listing is the repository's files, pyproject.toml ships exactly those directories and patterns,
`copy` never overwrites without --force. (The wheel's own copies: tests/test_packaging.py.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llm_refine import examples
from llm_refine.cli import main
from llm_refine.errors import UserError

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def repo_example_files() -> dict[str, Path]:
    """repository path ("launch/slurm.sh") -> file, for every file an example kind's patterns match."""
    found = {}
    for sub, patterns in examples.KINDS.values():
        for pat in patterns:
            for p in (REPO / sub).glob(pat):
                found[f"{sub}/{p.name}"] = p
    return found


def test_listing_is_the_repository_files():
    listed = examples.list_examples()
    assert examples.assets_root() == REPO  # a checkout reads recipes/ and launch/ where they are
    assert {ex.relpath: ex.path for ex in listed} == repo_example_files()
    assert {ex.kind for ex in listed} == {"recipe", "launch"}
    names = [ex.name for ex in listed]
    assert len(names) == len(set(names)), "two examples share a name (a recipe and a launch config?)"
    for ex in listed:
        assert ex.name == ex.path.stem and ex.description and "\n" not in ex.description, ex
    # the ones the docs name
    assert {"tiny", "pretrain_tiny", "c4", "single_cpu", "ddp", "fsdp", "deepspeed_zero3", "slurm", "torchrun"} <= set(names)


def test_description_is_the_first_comment_line(tmp_path):
    f = tmp_path / "x.sh"
    f.write_text("#!/bin/bash\n#\n# What it does.\n# More.\nset -e\n")
    assert examples.describe(f) == "What it does."
    g = tmp_path / "y.yaml"
    g.write_text("a: 1\n# late comment\n")
    assert examples.describe(g) == ""
    assert examples.find_example("single_cpu").description == "One process on the CPU (the tiny recipe, laptops, CI)."


def test_pyproject_ships_exactly_the_example_directories():
    """One source of truth: the wheel maps llm_refine/_assets/<dir> onto the repository's <dir>,
    with the patterns `examples` lists; the explicit package list is setuptools' own discovery."""
    from setuptools import find_packages

    st = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    data_pkgs = {f"llm_refine.{examples.ASSETS}.{sub}": (sub, pats) for sub, pats in examples.KINDS.values()}
    assert {k: v for k, v in st["package-dir"].items() if k in data_pkgs} == {k: sub for k, (sub, _) in data_pkgs.items()}
    for pkg, (_, pats) in data_pkgs.items():
        assert sorted(st["package-data"][pkg]) == sorted(pats), pkg
    code = set(find_packages(where=str(REPO), include=["llm_refine*"]))
    assert set(st["packages"]) == code | set(data_pkgs), "a package is missing from pyproject.toml's [tool.setuptools] packages"
    assert not (REPO / "llm_refine" / examples.ASSETS).exists()  # no second copy in the tree


def test_find_accepts_name_file_name_and_repository_path():
    a = examples.find_example("slurm")
    assert examples.find_example("slurm.sh") == a == examples.find_example("launch/slurm.sh")
    assert a.kind == "launch" and a.filename == "slurm.sh"
    with pytest.raises(UserError, match="not a shipped example.*tiny.*single_cpu"):
        examples.find_example("nope")


def test_copy_into_a_directory_a_file_and_refuse_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = REPO / "recipes" / "tiny.yaml"
    assert examples.copy_example("tiny") == Path("tiny.yaml")
    assert (tmp_path / "tiny.yaml").read_bytes() == src.read_bytes()
    with pytest.raises(UserError, match=r"tiny\.yaml: exists; pass --force"):
        examples.copy_example("tiny")
    (tmp_path / "tiny.yaml").write_text("edited\n")
    with pytest.raises(UserError, match="--force"):
        examples.copy_example("tiny", str(tmp_path))  # an existing directory: same file name inside
    assert (tmp_path / "tiny.yaml").read_text() == "edited\n"  # untouched
    examples.copy_example("tiny", force=True)
    assert (tmp_path / "tiny.yaml").read_bytes() == src.read_bytes()
    # a trailing slash means a directory, created; any other path is the file to write
    assert examples.copy_example("single_cpu", "launch/") == Path("launch/single_cpu.yaml")
    assert examples.copy_example("single_cpu", "cfg/acc.yaml") == Path("cfg/acc.yaml")
    assert (tmp_path / "cfg" / "acc.yaml").read_bytes() == (REPO / "launch" / "single_cpu.yaml").read_bytes()
    # a dangling symlink is an existing name too
    os.symlink(tmp_path / "missing", tmp_path / "link.yaml")
    with pytest.raises(UserError, match="--force"):
        examples.copy_example("tiny", "link.yaml")


def test_copied_scripts_are_executable(tmp_path):
    t = examples.copy_example("torchrun", tmp_path)
    assert t == tmp_path / "torchrun.sh" and os.stat(t).st_mode & stat.S_IXUSR


def test_copy_refuses_the_shipped_file_itself():
    with pytest.raises(UserError, match="shipped recipes/tiny.yaml itself"):
        examples.copy_example("tiny", REPO / "recipes", force=True)


def test_cli_list_show_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["examples", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "kind", "description"]
    rows = {ln.split()[0]: ln.split()[1] for ln in out[1:]}
    assert rows == {ex.name: ex.kind for ex in examples.list_examples()}
    assert "One process on the CPU" in next(ln for ln in out if ln.startswith("single_cpu "))
    assert main(["examples", "show", "single_cpu"]) == 0
    assert capsys.readouterr().out == (REPO / "launch" / "single_cpu.yaml").read_text()
    assert main(["examples", "copy", "pretrain_tiny"]) == 0
    assert capsys.readouterr().out.strip() == "wrote pretrain_tiny.yaml"
    assert main(["examples", "copy", "pretrain_tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llm-refine examples: error: pretrain_tiny.yaml: exists; pass --force to overwrite it"]
    assert main(["examples", "copy", "pretrain_tiny", "--force"]) == 0
    assert main(["examples", "copy", "nope"]) == 2
    assert "not a shipped example" in capsys.readouterr().err
    assert main(["examples"]) == 2  # an action is required


def test_shipped_launch_scripts_run_the_packaged_entry_point():
    for ex in examples.list_examples():
        if ex.path.suffix == ".sh":
            text = ex.path.read_text()
            assert "recipes/pretrain.py" not in text and "-m llm_refine.train" in text, ex.relpath
