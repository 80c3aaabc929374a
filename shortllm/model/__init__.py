"""Model stage: architecture adapters, loading (built-in models), block hooks, block replay, fingerprints."""
