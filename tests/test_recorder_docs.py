"""The accelerate example in docs/recorder.md is the tested script docs/recorder_accelerate_example.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from llm_refine.history import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "recorder_accelerate_example.py"


def test_doc_embeds_the_example_script():
    doc = (REPO / "docs" / "recorder.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    body = SCRIPT.read_text()
    # the doc shows the script from its imports on (the module docstring is in the prose)
    start = body.index("import argparse")
    assert any(body[start:].strip() == b.strip() for b in blocks), "docs/recorder.md is out of sync with the example script"


def test_example_script_runs_and_records(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--steps", "3", "--cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta, records = read_jsonl(tmp_path / "gradnorms.jsonl")
    assert [x["step"] for x in records] == [0, 1, 2]
    assert meta["engine"] == "single" and meta["source"] == "accelerate"
    assert all(x["l1"] > x["l2"] > 0 for x in records)
