"""Retraining stage: training loop, configuration, data, checkpoints."""
