"""The pipeline: recipe -> plan of stages -> launchers -> runner, or SLURM scripts.

Modules, each importing only those before it: `recipe` (the typed recipe), `plan` (stages and
each run's configuration), `stages` (one class per stage kind), `launchers` / `state` (how a
training runs; the state file and lock), `runner` (the scheduler), `slurm` (``--emit slurm``),
`cli` (the command line).
"""

from .cli import add_pipeline_arguments, main_pipeline
from .plan import plan
from .recipe import load_recipe
from .runner import Pipeline

__all__ = ["Pipeline", "plan", "load_recipe", "main_pipeline", "add_pipeline_arguments"]
