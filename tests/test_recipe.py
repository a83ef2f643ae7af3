"""Recipe validation: the shipped recipes load; a bad recipe fails at once with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm_refine.errors import UserError
from llm_refine.pipeline.recipe import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]


def base(**kw) -> dict:
    raw = {
        "sizes": ["cpu-0.5m", "cpu-2m"],
        "schedules": ["linear", "refined", "cosine"],
        "pretrain": {"data": {"source": "embedded"}, "train": {"max_steps": 30, "learning_rate": 0.003}},
    }
    raw.update(kw)
    return raw


def test_shipped_recipes_load():
    tiny = load_recipe(REPO / "recipes" / "tiny.yaml")
    assert len(tiny.sizes) >= 2 and all(s.startswith("cpu-") for s in tiny.sizes)
    assert [s.label for s in tiny.schedules] == ["linear", "refined", "cosine"]
    assert tiny.pretrain["data"]["source"] == "embedded"
    # Informative within its budget (issue #10): >= 2 seeds and a swept peak LR.
    assert len(tiny.seeds) >= 2 and max(len(tiny.lr_grid(s)) for s in tiny.sizes) >= 3
    study = load_recipe(REPO / "recipes" / "cpu-study.yaml")
    assert len(study.seeds) >= 3 and len(study.lr_grid("cpu-0.5m")) >= 3
    c4 = load_recipe(REPO / "recipes" / "c4.yaml")
    assert c4.sizes == ["124m", "350m", "760m", "1.3b"]
    assert c4.pretrain["data"]["source"] == "c4" and c4.pretrain["train"]["bf16"] is True
    assert c4.launch.launcher == "accelerate" and (REPO / c4.launch.config).exists()


def test_defaults():
    r = parse_recipe(base())
    assert r.seeds == [0] and r.lr_multipliers == [1.0]
    assert (r.refine.norm, r.refine.tau, r.refine_seed, r.refine_lr_multiplier) == ("l1", 0.1, 0, 1.0)
    assert r.schedule_config("refined", "x.json") == {"name": "refined", "file": "x.json"}
    r2 = parse_recipe(base(lr_multipliers=[0.5, 2, 4], seeds=[3, 1], schedule={"warmup_steps": 5}, refine={"warmup": True}))
    assert r2.refine_lr_multiplier == 2 and r2.refine_seed == 3
    assert r2.schedule_config("refined", "x.json")["warmup_steps"] == 5
    assert r2.schedule_config("cosine") == {"warmup_steps": 5, "name": "cosine"}


def test_schedule_options_and_labels():
    r = parse_recipe(base(schedules=["linear", "refined", {"name": "wsd", "decay_fraction": 0.1, "label": "wsd10"}, "wsd"]))
    assert [s.label for s in r.schedules] == ["linear", "refined", "wsd10", "wsd"]
    assert r.schedule_config("wsd10") == {"decay_fraction": 0.1, "name": "wsd"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sizez": ["cpu-2m"]}, r"r.yaml: sizez: unknown key in the recipe; allowed: .*sizes"),
        ({"sizes": ["cpu-3m"]}, r"sizes\[0\]: unknown model size 'cpu-3m'; choose one of .*cpu-0.5m"),
        ({"sizes": []}, r"sizes: is missing"),
        ({"schedules": ["linear", "cosinus"]}, r"schedules\[1\]: unknown schedule 'cosinus'; choose one of .*cosine"),
        ({"schedules": ["refined", "cosine"]}, r"must include 'linear'"),
        ({"schedules": ["linear", "cosine", "cosine"]}, r"listed twice"),
        ({"schedules": ["linear", {"name": "wsd", "decay_fractoin": 0.2}]},
         r"schedules\[1\].decay_fractoin: unknown key in WSDSchedule; allowed: .*decay_fraction"),
        ({"refine": {"norm": "l3"}}, r"refine.norm: 'l3' is not allowed; choose one of l1, l2"),
        ({"refine": {"taux": 0.1}}, r"refine.taux: unknown key in RefineSettings; allowed: norm, tau"),
        ({"refine": {"seed": 7}}, r"refine.seed: 7 is not one of the recipe's seeds"),
        ({"seeds": [0, 0]}, r"seeds: \[0, 0\] lists a value twice"),
        ({"seeds": ["a"]}, r"seeds\[0\]: 'a' is not an integer"),
        ({"lr_multipliers": [0]}, r"lr_multipliers\[0\]: 0.0 is out of range; allowed: \(0.0, inf\)"),
        ({"schedule": {"warmup": 3}}, r"schedule.warmup: unknown key in SharedScheduleOptions"),
        ({"launch": {"launcher": "mpirun"}}, r"launch.launcher: 'mpirun' is not allowed; choose one of inprocess, accelerate"),
        ({"slurm": {"gpus": 8}}, r"slurm.gpus: unknown key in SlurmSettings"),
        ({"size_overrides": {"cpu-8m": ["train.max_steps=5"]}}, r"size_overrides.cpu-8m: names size 'cpu-8m'"),
        ({"size_overrides": {"cpu-2m": ["train.max_steps"]}}, r"not a dotted key=value"),
        ({"pretrain": {"schedule": {"name": "cosine"}}}, r"pretrain.schedule: is set by the pipeline from 'schedules'"),
        ({"pretrain": {"model": {"size": "cpu-2m"}}}, r"pretrain.model.size: is set by the pipeline from 'sizes'"),
        ({"pretrain": {"train": {"seed": 1}}}, r"pretrain.train.seed: is set by the pipeline from 'seeds'"),
        ({"size_overrides": {"cpu-2m": ["schedule.name=cosine"]}}, r"size_overrides.cpu-2m.schedule: is set by the pipeline"),
        ({"pretrain": {"train": {"max_stepz": 5}}},
         r"pretrain.train.max_stepz: unknown key in TrainConfig; allowed: max_steps.* \(in the run: size cpu-0.5m"),
        ({"pretrain": {"data": {"source": "files", "path": "no/such/corpus.jsonl"}}},
         r"pretrain.data.path: 'no/such/corpus.jsonl' does not exist"),
        ({"pretrain": {"data": {"source": "embedded", "tokenizer": "missing/spm.model"}}}, r"pretrain.data.tokenizer: .* does not exist"),
    ],
)
def test_bad_recipes_fail_clearly(change, message):
    with pytest.raises(UserError, match=message):
        parse_recipe(base(**change), path="r.yaml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sizes: [cpu-2m\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="a recipe is a YAML mapping"):
        load_recipe(lst)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text; save the recipe as UTF-8"):
        load_recipe(latin)


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path, capsys):
    from llm_refine.cli import main

    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(base(sizes=["cpu-3m"])))
    assert main(["pipeline", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown model size 'cpu-3m'" in err
    assert not (tmp_path / "out").exists()  # nothing ran
