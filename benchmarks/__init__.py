"""GPU benchmarks against the peers, run in one call by benchmarks/run_all.py."""
