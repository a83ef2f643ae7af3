"""Schedule files: long schedules are stored compactly (issue #11) with the same validation."""

import base64
import json

import numpy as np
import pytest

from llm_refine.artifact import COMPACT_MIN_STEPS, make_schedule_artifact, read_schedule, write_schedule
from llm_refine.cli import main
from llm_refine.schedules import load_multipliers


@pytest.fixture(scope="module")
def long_schedule(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    T = COMPACT_MIN_STEPS + 50_000
    t = np.arange(T) / T
    norms = (1 + 4 * np.exp(-t / 0.02)) * (1 - 0.6 * t) * np.random.default_rng(0).lognormal(0, 0.2, T)
    np.save(d / "h.npy", norms)
    assert main(["refine", str(d / "h.npy"), "-o", str(d / "s.json")]) == 0
    from llm_refine import refine_schedule

    return d / "s.json", refine_schedule(norms), T


def test_long_schedule_is_compact_and_reads_back(long_schedule, capsys):
    path, m, T = long_schedule
    raw = json.loads(path.read_text())
    assert "multipliers" not in raw and raw["multipliers_encoding"] == "float32-le-base64" and raw["multipliers_length"] == T
    assert path.stat().st_size < 6 * T  # ~5.3 bytes per step (a JSON list takes ~22)
    back = read_schedule(path)["multipliers"]
    assert isinstance(back, np.ndarray) and back.dtype == np.float64 and back.size == T
    np.testing.assert_allclose(back, m, rtol=6e-8, atol=1e-12)
    assert back.max() == 1.0 and back[-1] == 0.0
    np.testing.assert_array_equal(load_multipliers(path), back)
    capsys.readouterr()
    assert main(["show", str(path)]) == 0
    assert f"T={T} steps" in capsys.readouterr().out


def test_short_schedule_stays_a_json_list(tmp_path):
    art = make_schedule_artifact(np.linspace(1, 0, 50), provenance={})
    write_schedule(tmp_path / "s.json", art)
    raw = json.loads((tmp_path / "s.json").read_text())
    assert isinstance(raw["multipliers"], list) and len(raw["multipliers"]) == 50


def _compact(m, **over):
    data = np.asarray(m, dtype="<f4").tobytes()
    obj = {"format": "llm-refine/schedule", "version": 1, "multipliers_encoding": "float32-le-base64",
           "multipliers_length": len(m), "multipliers_data": base64.b64encode(data).decode(), "provenance": {}}
    obj.update(over)
    return json.dumps(obj)


@pytest.mark.parametrize(
    "content,needle",
    [
        (_compact([1.0, 0.5, 0.0], multipliers_data="@@not base64@@"), "not valid base64"),
        (_compact([1.0, 0.5, 0.0], multipliers_length=4), "says 4"),
        (_compact([1.0, 0.5, 0.0], multipliers_length="3"), "whole number"),
        (_compact([1.0, np.nan, 0.0]), "finite"),
        (_compact([0.0, 0.0, 0.0]), "learning rate 0"),
        (_compact([2.0, 0.0]), "within [0, 1]"),
        (_compact([1.0]), "at least 2"),
        (_compact([1.0, 0.0], multipliers_encoding="float16"), "multipliers_encoding"),
    ],
)
def test_corrupt_compact_schedule_is_one_line_error(tmp_path, capsys, content, needle):
    p = tmp_path / "s.json"
    p.write_text(content)
    assert main(["show", str(p)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "s.json" in err and needle in err, err
