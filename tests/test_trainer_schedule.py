"""The one-line Trainer integration: `use_schedule(Trainer(...), spec)`, including resume."""


import numpy as np
import pytest
import torch
from torch import nn

from llm_refine import use_schedule
from llm_refine.artifact import make_schedule_artifact, write_schedule
from llm_refine.schedules import make_schedule

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

STEPS = 12
PEAK = 0.05


class TinyRegression(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x.sum(-1)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class LRLog(TrainerCallback):
    def __init__(self, stop_after=None):
        self.lrs = {}
        self.stop_after = stop_after

    def on_step_end(self, args, state, control, lr_scheduler=None, **kw):
        # LR used for the step just taken (index global_step-1) is the scheduler's previous value
        self.lrs[state.global_step - 1] = self._last
        if self.stop_after is not None and state.global_step >= self.stop_after:
            control.should_training_stop = True

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self._last = optimizer.param_groups[0]["lr"]


def make_trainer(out, spec, cb, save_steps=4):
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=PEAK,
        save_steps=save_steps,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    return use_schedule(Trainer(model=TinyRegression(), args=args, train_dataset=Data(), callbacks=[cb]), spec)


@pytest.mark.parametrize("spec", ["cosine", {"name": "wsd", "warmup_steps": 2, "decay_fraction": 0.5}, "refined-file"])
def test_trainer_lr_follows_schedule_and_resume_matches(tmp_path, spec):
    if spec == "refined-file":
        m = np.array([0.3, 1.0, 0.9, 0.6, 0.4, 0.0])
        p = tmp_path / "refined.json"
        write_schedule(p, make_schedule_artifact(m, provenance={"source": "test"}))
        spec = str(p)
        fn = make_schedule({"name": "refined", "file": spec})
    else:
        fn = make_schedule(spec, STEPS)

    full = LRLog()
    make_trainer(tmp_path / "full", spec, full).train()
    expected = [PEAK * fn(s, STEPS) for s in range(STEPS)]
    np.testing.assert_allclose([full.lrs[s] for s in range(STEPS)], expected, rtol=1e-6)

    # interrupted after the checkpoint at step 8 (stopped at 10: steps 9-10 are lost), then resumed
    first = LRLog(stop_after=10)
    make_trainer(tmp_path / "resumed", spec, first).train()
    assert (tmp_path / "resumed" / "checkpoint-8").is_dir()
    second = LRLog()
    make_trainer(tmp_path / "resumed", spec, second).train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-8"))
    assert sorted(second.lrs) == list(range(8, STEPS))
    np.testing.assert_allclose([second.lrs[s] for s in range(8, STEPS)], expected[8:], rtol=1e-6)
