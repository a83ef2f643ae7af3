import os
from pathlib import Path

import pytest

# One thread per process: the CI machine has 2 cores and distributed tests start several processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO.parent / "shared" / "data" / "gradnorm-traces"


@pytest.fixture
def traces_dir() -> Path:
    if not TRACES.is_dir():
        pytest.skip("../shared/data/gradnorm-traces is not present (a user's clone has no ../shared)")
    return TRACES


# Opt-in groups: slow tests that the default run (the README's test command) skips with the reason;
# `-m NAME` selects them, and .ci/run runs each group explicitly.
OPT_IN = {
    "cluster": "a real loopback Slurm cluster and 2-node runs (minutes): selected only by `-m cluster`, "
               "e.g. python -m pytest -m cluster tests/test_slurm.py tests/test_multinode.py (.ci/run runs it)",
}


def pytest_collection_modifyitems(config, items):
    expr = config.getoption("markexpr") or ""
    for item in items:
        for name, why in OPT_IN.items():
            if item.get_closest_marker(name) is not None and name not in expr:
                item.add_marker(pytest.mark.skip(reason=why))
