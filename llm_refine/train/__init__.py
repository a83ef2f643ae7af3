"""Training: configs, data, tokenizers, models, pretraining, evaluation and the run directory."""
