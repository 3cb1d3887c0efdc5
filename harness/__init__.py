"""The benchmark and verification harness: runs one shared training loop over Chronicals and its peers (PyTorch/HF,
torch.compile, Liger-Kernel, Unsloth), each run in its own subprocess, verifies every run against the reference
backend and writes one tidy result row per run and metric (docs/CONTRACTS.md, "Harness results")."""
