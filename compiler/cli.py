"""Command line: `python -m compiler {demo,inspect,warmup}`.

    demo                      compile the bundled models, check each against eager, report
    inspect MODULE:FACTORY    compile FACTORY() -> (model, args), print report and kernel sources
    warmup MODULE:FACTORY     generate and load kernels for the factory's example inputs

A factory is any importable function returning (model, example args tuple).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

import compiler


def load_factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise SystemExit(f"expected MODULE:FACTORY, got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


def inspect(spec: str, dump: str | None) -> None:
    model, args = load_factory(spec)()
    compiled = compiler.compile(model)
    with torch.no_grad():
        compiled(*args)
    print(compiled.report())
    for kernel in compiled.kernels:
        print(f"\n# ---- {kernel.name} ({kernel.pattern}) {kernel.path}")
        if dump:
            target = Path(dump) / f"{kernel.name}.py"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(kernel.source)
            print(f"# written to {target}")
        else:
            print(kernel.source)


def warmup(spec: str) -> None:
    model, args = load_factory(spec)()
    compiled = compiler.warmup(model, [args])
    print(compiled.report())
    for kernel in compiled.kernels:
        print(f"{kernel.name}: {kernel.path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compiler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="compile and check the bundled models")
    inspect_parser = commands.add_parser("inspect", help="print generated kernel sources")
    inspect_parser.add_argument("factory", help="MODULE:FACTORY returning (model, args)")
    inspect_parser.add_argument("--dump", help="write sources into this folder instead of printing")
    warmup_parser = commands.add_parser("warmup", help="generate and load kernels ahead of time")
    warmup_parser.add_argument("factory", help="MODULE:FACTORY returning (model, args)")
    options = parser.parse_args(argv)
    if options.command == "demo":
        from compiler.demo import run_demo

        return run_demo()
    if options.command == "inspect":
        inspect(options.factory, options.dump)
    else:
        warmup(options.factory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
