"""The shipped examples: the recipes (``recipes/*.yaml``) and launch configs (``launch/*.yaml``,
``launch/*.sh``), reachable from an installed package.

One source of truth: the repository's ``recipes/`` and ``launch/`` directories. The wheel carries
them as package data under ``llm_refine/_assets/recipes`` and ``llm_refine/_assets/launch``
(pyproject.toml maps those two data packages onto the directories); a checkout or an editable
install reads them where they are. `llm-refine examples list | show | copy` is the command line.

An example's name is its file name without the suffix (``tiny``, ``single_cpu``, ``slurm``); the
file name (``slurm.sh``) and the repository path (``launch/slurm.sh``) are accepted too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# kind -> (directory in the repository and under _assets, file patterns)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "recipe": ("recipes", ("*.yaml",)),
    "launch": ("launch", ("*.yaml", "*.sh")),
}
ASSETS = "_assets"  # llm_refine/_assets/<dir>/ inside an installed wheel


@dataclass(frozen=True)
class Example:
    name: str  # file name without its suffix: what `llm-refine examples copy NAME` takes
    kind: str  # "recipe" or "launch"
    path: Path  # the shipped file

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def relpath(self) -> str:
        """The repository path, e.g. ``launch/single_cpu.yaml`` (what the docs name)."""
        return f"{KINDS[self.kind][0]}/{self.path.name}"

    @property
    def description(self) -> str:
        return describe(self.path)


def assets_root() -> Path:
    """The directory holding ``recipes/`` and ``launch/``: the package's own ``_assets`` in an
    installed wheel, else the checkout the package is imported from (editable install, source tree)."""
    pkg = Path(__file__).resolve().parent
    packaged = pkg / ASSETS
    if packaged.is_dir():
        return packaged
    checkout = pkg.parent
    if (checkout / "pyproject.toml").is_file() and all((checkout / d).is_dir() for d, _ in KINDS.values()):
        return checkout
    raise UserError(f"{packaged}: the shipped recipes and launch configs are not installed; reinstall llm-refine")


def describe(path: str | os.PathLike) -> str:
    """The file's first comment line (a shell script's ``#!`` line skipped), without the ``#``."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            s = line.strip()
            if s.startswith("#!"):
                continue
            if s.startswith("#"):
                text = s.lstrip("#").strip()
                if text:
                    return text
                continue
            if s:
                break
    return ""


def list_examples() -> list[Example]:
    """Every shipped example, recipes first, each kind sorted by name."""
    root = assets_root()
    found: list[Example] = []
    for kind, (sub, patterns) in KINDS.items():
        files = sorted({p for pat in patterns for p in (root / sub).glob(pat) if p.is_file()}, key=lambda p: p.name)
        found += [Example(name=p.stem, kind=kind, path=p) for p in files]
    return found


def find_example(name: str) -> Example:
    """The example called ``name`` (``tiny``, ``tiny.yaml`` or ``recipes/tiny.yaml``)."""
    key = name.replace("\\", "/").strip()
    every = list_examples()
    for ex in every:
        if key in (ex.name, ex.filename, ex.relpath):
            return ex
    raise UserError(f"{name!r} is not a shipped example; choose one of {', '.join(ex.name for ex in every)} "
                    "(`llm-refine examples list` describes them)")


def copy_example(name: str, dest: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Copy the example ``name`` to ``dest`` and return the file written.

    ``dest``: a directory (existing, or given with a trailing slash) receives the example under its
    own file name; any other path is the file to write (missing parent directories are created).
    Default: the current directory. An existing file is refused unless ``force``.
    """
    from .fileio import atomic_write_bytes, check_output_path, same_file

    ex = find_example(name)
    raw = os.fspath(dest) if dest is not None else "."
    if raw == "":
        raise UserError("the destination is empty; give a directory or a file name")
    is_dir = raw.endswith(("/", os.sep)) or Path(raw).is_dir()
    target = Path(raw) / ex.filename if is_dir else Path(raw)
    if os.path.lexists(target):
        if os.path.exists(target) and same_file(target, ex.path):
            raise UserError(f"{target}: is the shipped {ex.relpath} itself; copy it somewhere else")
        if not force:
            raise UserError(f"{target}: exists; pass --force to overwrite it")
    check_output_path(target, what="copy")
    atomic_write_bytes(target, ex.path.read_bytes())
    if ex.path.suffix == ".sh":  # a launch script stays runnable (wheels need not keep the mode)
        mask = os.umask(0)
        os.umask(mask)
        real = Path(os.path.realpath(target))
        real.chmod(real.stat().st_mode | (0o111 & ~mask))
    return target


def format_examples(examples: list[Example]) -> str:
    """``llm-refine examples list``: one line per example (name, kind, first comment line)."""
    width = max((len(ex.name) for ex in examples), default=4)
    lines = [f"{'name':<{width}}  kind    description"]
    lines += [f"{ex.name:<{width}}  {ex.kind:<6}  {ex.description}" for ex in examples]
    return "\n".join(lines)


__all__ = ["Example", "KINDS", "assets_root", "describe", "list_examples", "find_example", "copy_example", "format_examples"]
