"""Codegen: Jinja templates rendered into Triton source, one template per kernel family."""
