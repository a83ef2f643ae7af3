"""`llm-refine bench history` runs end to end at a small size (its numbers are printed, never asserted)."""

import json

import pytest

from llm_refine.cli import main

pytest.importorskip("pandas")
pytest.importorskip("pyarrow")


def test_bench_history_small(capsys):
    assert main(["bench", "history", "--steps", "3000", "--repeats", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [x["format"] for x in r["results"]] == ["CSV", "W&B CSV", "JSONL"]
    for x in r["results"]:
        assert x["rows"] == 3000 and x["reader"] == "pyarrow"
        assert x["reader_s"] > 0 and x["reference_s"] > 0 and x["command_s"] > 0 and x["peak_rss_mb"] > 10
        assert x["schedule_mb"] > 0
    assert r["results"][2]["reference"] == "pyarrow.json.read_json"
