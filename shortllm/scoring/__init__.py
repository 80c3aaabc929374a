"""Scoring stage: the one-pass engine, its collectors, PPL replay, searches, out-of-core scoring, resume, Scores."""
