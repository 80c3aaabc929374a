"""Evaluation stage: corpus perplexity, zero-shot accuracy, report tables."""
