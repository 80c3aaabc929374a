"""Speed benchmark: SmolLM2-135M original vs depth-pruned (20% / 35% of parameters) vs a width-pruned
BASELINE of equal parameter count vs the fused depth-pruned model; batch 1 / 8 / 32, prefill and decode
tokens/s with HF generate. Writes benchmarks/results/speed.{md,json,png}.

    python benchmarks/bench_speed.py [--batches 1,8,32] [--new-tokens 32] [--repeats 5]
"""
import sys

from speedbench import main

if __name__ == "__main__":
    sys.exit(main())
