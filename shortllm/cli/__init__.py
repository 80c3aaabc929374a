"""The `shortllm` command line (argparse only). Nothing in the library imports this package."""
