"""LR schedulers for torch and the HF Trainer, from any `llm_refine.schedules` config.

- `lambda_lr(optimizer, config, total_steps)`: a ``torch.optim.lr_scheduler.LambdaLR``;
- `get_refined_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, schedule)`:
  the transformers-style factory (like ``get_linear_schedule_with_warmup``);
- `use_schedule(trainer, config)`: makes a ``transformers.Trainer`` use the schedule, in one line.
"""

from __future__ import annotations

from collections.abc import Mapping

from .schedules import ScheduleConfig, make_schedule, resolve_schedule

def lambda_lr(optimizer, config: ScheduleConfig | dict | str, total_steps: int, last_epoch: int = -1):
    """A ``torch.optim.lr_scheduler.LambdaLR`` for any schedule (the LR at step s is peak·m(s, T))."""
    from torch.optim.lr_scheduler import LambdaLR

    schedule = make_schedule(config, total_steps)

    # A plain function, not a callable object: LambdaLR pickles callable objects' __dict__ into
    # checkpoints, and the Trainer reloads those with weights_only=True, which rejects them. The
    # schedule is rebuilt from the config on resume; only last_epoch needs saving.
    def lr_lambda(step: int) -> float:
        return schedule(step, total_steps)

    return LambdaLR(optimizer, lr_lambda, last_epoch=last_epoch)


def get_refined_schedule_with_warmup(
    optimizer, num_warmup_steps: int | None, num_training_steps: int,
    schedule: ScheduleConfig | Mapping | str = "linear", last_epoch: int = -1,
):
    """The transformers-style factory (like ``get_linear_schedule_with_warmup``): a ``LambdaLR``
    for ``schedule`` — typically ``"refined.json"`` from ``llm-refine refine`` — over
    ``num_training_steps``. ``num_warmup_steps`` (None: the schedule's own) sets the linear warm-up;
    for a refined schedule it multiplies the first steps on top of the refined shape, which usually
    has a warm-up of its own already (pass 0 or None to use it as computed)."""
    config = resolve_schedule(schedule)
    if num_warmup_steps is not None:
        config = config.replace(warmup_steps=int(num_warmup_steps), warmup_ratio=0.0)
    return lambda_lr(optimizer, config, num_training_steps, last_epoch=last_epoch)


def use_schedule(trainer, config: ScheduleConfig | dict | str):
    """Make ``trainer`` (a ``transformers.Trainer``) use ``config``'s schedule. Returns the trainer.

    One line: ``use_schedule(Trainer(...), "refined.json")`` — a string that names a file is read
    as a refined schedule artifact, any other string as a schedule name. The peak LR is
    ``args.learning_rate``; the Trainer's own warm-up settings are ignored (give warm-up in the
    config). The scheduler is built when the Trainer builds its own, with the run's real number of
    optimizer steps, and its state is saved and restored with checkpoints like any scheduler.
    """
    config = resolve_schedule(config)

    def create_scheduler(num_training_steps: int, optimizer=None):
        if trainer.lr_scheduler is None:
            trainer.lr_scheduler = lambda_lr(optimizer if optimizer is not None else trainer.optimizer, config, num_training_steps)
            trainer._created_lr_scheduler = True
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler
    return trainer
