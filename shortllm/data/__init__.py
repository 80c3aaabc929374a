"""Data stage: corpora, calibration loaders, zero-shot task files."""
