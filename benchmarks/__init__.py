"""GPU benchmark scripts (run with python3 benchmarks/<name>.py --out DIR)."""
