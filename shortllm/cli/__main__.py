"""`python -m shortllm.cli ...` (what torchrun launches)."""
import sys

from shortllm.cli.app import main

sys.exit(main())
