"""The pipeline: recipe -> plan of stages -> launchers -> runner, or SLURM scripts."""
