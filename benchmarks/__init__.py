"""Speed and memory ratios, each measured side by side in one run: ``python -m benchmarks.run``."""
