"""What users run: the CLI, recipes (`configs/`), training, evaluation, prediction and serving."""
