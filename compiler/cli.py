"""Command line: `python -m compiler {demo,inspect,warmup}`.

    demo                      compile the bundled models, check each against eager, report
    inspect MODULE:FACTORY    compile FACTORY() -> (model, args), print report and kernel sources
    warmup MODULE:FACTORY [--shapes k=v,k=v ...] [--mode max-autotune|default]
                              generate, load and tune kernels for each shape (FACTORY(**shape))
    cache export FILE | cache import FILE
                              ship the kernel + autotune cache as one zip file

A factory is any importable function returning (model, example args tuple); `--shapes`
calls it once per entry with those keyword arguments (e.g. batch=8,length=1024).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

import compiler
from runtime import knobs
from runtime.autotune import MODES, default_autotuner


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


def parse_shape(text: str) -> dict:
    """"batch=8,length=1024" -> {"batch": 8, "length": 1024}."""
    shape = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        shape[key] = int(value) if value.lstrip("-").isdigit() else value
    return shape


def warmup(spec: str, shapes: list[str], mode: str) -> None:
    factory = load_factory(spec)
    examples = [factory(**parse_shape(shape)) for shape in shapes or [""]]
    model = examples[0][0]
    tuner = default_autotuner()
    tuned_before = tuner.benchmarks_run
    started = time.perf_counter()
    compiled = compiler.warmup(model, [args for _, args in examples], mode=mode)
    print(compiled.report())
    for kernel in compiled.kernels:
        print(f"{kernel.name}: {kernel.path} config={kernel.config}")
    print(f"warmed {len(examples)} shape(s), {len(compiled.kernels)} kernel(s), "
          f"{tuner.benchmarks_run - tuned_before} tuned, in {time.perf_counter() - started:.1f} s; "
          f"cache {knobs.cache_dir()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compiler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="compile and check the bundled models")
    inspect_parser = commands.add_parser("inspect", help="print generated kernel sources")
    inspect_parser.add_argument("factory", help="MODULE:FACTORY returning (model, args)")
    inspect_parser.add_argument("--dump", help="write sources into this folder instead of printing")
    warmup_parser = commands.add_parser("warmup", help="generate, load and tune kernels ahead of time")
    warmup_parser.add_argument("factory", help="MODULE:FACTORY returning (model, args)")
    warmup_parser.add_argument("--shapes", nargs="*", default=[], help="k=v,k=v keyword arguments per shape")
    warmup_parser.add_argument("--mode", choices=MODES, default="max-autotune")
    cache_parser = commands.add_parser("cache", help="export or import the kernel cache")
    cache_parser.add_argument("action", choices=("export", "import"))
    cache_parser.add_argument("file")
    options = parser.parse_args(argv)
    if options.command == "demo":
        from compiler.demo import run_demo

        return run_demo()
    if options.command == "inspect":
        inspect(options.factory, options.dump)
    elif options.command == "warmup":
        warmup(options.factory, options.shapes, options.mode)
    elif options.action == "export":
        print(f"exported {compiler.export_cache(options.file)} entries to {options.file}")
    else:
        print(f"imported {compiler.import_cache(options.file)} entries from {options.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
