"""GPU benchmarks against the peers, run in one call by benchmarks/run_all.py.

Importing the package imports flashfx's runtime first: on a machine without CUDA it switches
Triton's interpreter on, which must happen before anything imports triton (benchmarks.common does),
or every fused op falls back to PyTorch (runtime.interpret).
"""
import runtime  # noqa: F401
