"""Fine-tuning: the train loop, its config, the multi-market sampler, checkpoints and resume, MLflow
tracking, and the run directory that evaluation and serving read."""
