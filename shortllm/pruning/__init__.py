"""Pruning stage: plans, block removal, export (transformers, mergekit), the fused model, the width baseline."""
