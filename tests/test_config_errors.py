"""Every bad configuration found by trying the project as a new user would is rejected before any
training starts, with one line that names the file, the key path, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm_refine.cli import main as cli_main
from llm_refine.errors import UserError
from llm_refine.schedules import ScheduleConfig

REPO = Path(__file__).resolve().parents[1]
TINY = (REPO / "recipes" / "tiny.yaml").read_text(encoding="utf-8")


def _recipe_with(tmp_path: Path, yaml_patch: str) -> Path:
    """recipes/tiny.yaml with ``yaml_patch`` (literal YAML, so .nan and true are YAML's) merged in."""
    raw = yaml.safe_load(TINY)
    patch = yaml.safe_load(yaml_patch)

    def merge(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v

    merge(raw, patch)
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return f


RECIPE_CASES = [
    ("pretrain: {train: {learning_rate: .nan}}", r"pretrain.train.learning_rate: nan is not a finite number"),
    ("refine: {tau: .nan}", r"refine.tau: nan is not a finite number"),
    ("pretrain: {train: {max_steps: 10.5}}", r"pretrain.train.max_steps: 10.5 is not an integer"),
    ("pretrain: {train: {max_steps: true}}", r"pretrain.train.max_steps: True is not an integer"),
    ("pretrain: {train: {max_steps: ten}}", r"pretrain.train.max_steps: 'ten' is not an integer"),
    ("schedules: [linear, refined, {name: polynomial, power: -1}]",
     r"schedules\[2\].power: -1.0 is out of range; allowed: \(0.0, inf\)"),
    ("schedules: [linear, refined, {name: wsd, decay_shape: zigzag}]",
     r"schedules\[2\].decay_shape: 'zigzag' is not allowed; choose one of linear, cosine, 1-sqrt"),
    ("schedules: [linear, {name: wsd, decay_fraction: 5}]", r"schedules\[1\].decay_fraction: 5.0 is out of range; allowed: \(0.0, 1.0\]"),
    ("schedules: [linear, {name: wsd, decay_fraction: -1}]", r"schedules\[1\].decay_fraction: -1.0 is out of range"),
    ("pretrain: {data: {vocab_size: 3}}", r"pretrain.data.vocab_size: 3 is too small for a trained sentencepiece tokenizer; allowed: >= 512"),
    ("slurm: {nodes: '2'}", r"slurm.nodes: '2' is not an integer"),
    ("launch: {extra_args: '--foo'}", r"launch.extra_args: '--foo' is not a list; write a YAML list"),
    ("schedules: [linear, {name: cosine, power: 5}]", r"schedules\[1\].power: unknown key in CosineSchedule; allowed: warmup_steps, warmup_ratio, min_ratio"),
    ("size_overrides: {cpu-2m: {train: {max_steps: 10.5}}}",
     r"pretrain.train.max_steps: 10.5 is not an integer \(in the run: size cpu-2m"),
]


@pytest.mark.parametrize("patch, message", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_pipeline_rejects_before_training(tmp_path, capsys, patch, message):
    recipe = _recipe_with(tmp_path, patch)
    out = tmp_path / "out"
    assert cli_main(["pipeline", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    print(err)  # the message, as a user sees it (pytest -s)
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"llm-refine pipeline: error: {recipe}: ")
    import re

    assert re.search(message, err), err
    assert not out.exists()  # nothing was planned, written or trained


PRETRAIN_CASES = [
    (["train.max_steps=10.5"], r"train.max_steps: 10.5 is not an integer"),
    (["train.max_steps=true"], r"train.max_steps: True is not an integer"),
    (["train.max_steps=ten"], r"train.max_steps: 'ten' is not an integer"),
    (["train.learning_rate=.nan"], r"train.learning_rate: nan is not a finite number"),
    (["data.vocab_size=3"], r"data.vocab_size: 3 is too small"),
    (["schedule.name=polynomial", "schedule.power=-1"], r"schedule.power: -1.0 is out of range"),
    (["schedule.name=wsd", "schedule.decay_shape=zigzag"], r"schedule.decay_shape: 'zigzag' is not allowed"),
    (["schedule.name=cosine", "schedule.power=5"], r"schedule.power: unknown key in CosineSchedule"),
]


@pytest.mark.parametrize("sets, message", PRETRAIN_CASES, ids=[" ".join(c[0]) for c in PRETRAIN_CASES])
def test_pretrain_entry_point_rejects_before_training(tmp_path, capsys, sets, message):
    from llm_refine.train.__main__ import main

    out = tmp_path / "run"
    rc = main([str(REPO / "recipes" / "pretrain_tiny.yaml"), "--output_dir", str(out), "--set", *sets])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    import re

    assert re.search(message, err) and "recipes/pretrain_tiny.yaml: " in err, err
    assert err.startswith("python -m llm_refine.train: error: ")  # names the command, like the CLI
    assert not out.exists()


def test_schedule_options_that_do_not_apply_are_errors():
    with pytest.raises(UserError, match=r"power: unknown key in CosineSchedule; allowed: warmup_steps, warmup_ratio, min_ratio"):
        ScheduleConfig.create("cosine", power=5)
    from llm_refine.schedules import CosineSchedule

    with pytest.raises(TypeError):  # a dataclass: an option it does not have is not a keyword
        CosineSchedule(power=5)
    with pytest.raises(UserError, match=r"min_ratio: 2.0 is out of range; allowed: \[0.0, 1.0\]"):
        CosineSchedule(min_ratio=2)  # checked however it is built


def test_run_config_is_a_file_the_run_can_be_rerun_from(tmp_path):
    """The pipeline hands each run its resolved config; it loads back to the same config."""
    from llm_refine.pipeline.recipe import load_recipe
    from llm_refine.train.config import load_pretrain_config

    r = load_recipe(REPO / "recipes" / "tiny.yaml")
    cfg = r.run_config("cpu-2m", 0, 2.0, "cosine", tmp_path / "run")
    assert cfg.train.learning_rate == pytest.approx(0.006) and cfg.schedule.name == "cosine"
    assert cfg.schedule.warmup_steps == 25 and cfg.model.size == "cpu-2m"
    import json

    f = tmp_path / "run_config.json"
    f.write_text(json.dumps(cfg.to_dict()))
    assert load_pretrain_config(f) == cfg
