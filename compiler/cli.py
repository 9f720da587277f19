"""Command line: `python -m compiler {demo,inspect,warmup}`.

    demo                      compile the bundled models, check each against eager, report
    inspect MODULE:FACTORY    compile FACTORY() -> (model, args), print report and kernel sources
    warmup MODULE:FACTORY [--shapes k=v,k=v ...] [--mode max-autotune|default]
                              generate, load and tune kernels for each shape (FACTORY(**shape))
    cache export FILE | cache import FILE
                              ship the kernel + autotune cache as one zip file

A factory is any importable function returning (model, example args tuple); `--shapes`
calls it once per entry with those keyword arguments (e.g. batch=8,length=1024).

A mistake in the command (a factory that cannot be imported or called so, a bad --shapes entry,
a missing or broken cache file, a missing export folder) prints one line saying what to fix,
"python -m compiler: error: ...", and exits with status 2 (usage) or 1 (a file), no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import inspect as pyinspect
import sys
import time
import zipfile
from pathlib import Path

import torch

import compiler
from runtime import knobs
from runtime.autotune import MODES, default_autotuner
from runtime.bundle import ArchiveError

EXAMPLE = "models.gpt:tiny_naive"


class UsageError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


def load_factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"expected MODULE:FACTORY (e.g. {EXAMPLE}), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"cannot import module {module_name!r} ({error}); check the name and PYTHONPATH") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"module {module_name!r} has no factory {attribute!r} (a function returning "
                         f"(model, args)); e.g. {EXAMPLE}")
    return factory


def call_factory(spec: str, factory, shape: dict) -> tuple:
    """factory(**shape) as (model, args), after checking that it takes these keywords."""
    signature = pyinspect.signature(factory)
    try:
        signature.bind(**shape)
    except TypeError as error:
        raise UsageError(f"{spec} cannot be called with {shape or 'no arguments'} ({error}); "
                         f"its parameters are {signature}") from None
    example = factory(**shape)
    if not (isinstance(example, tuple) and len(example) == 2):
        raise UsageError(f"{spec} must return (model, args), got a {type(example).__name__}")
    return example


def inspect(spec: str, dump: str | None) -> None:
    model, args = call_factory(spec, load_factory(spec), {})
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
        key, equals, value = item.partition("=")
        if not key.isidentifier() or not equals:
            raise UsageError(f"bad --shapes entry {item!r}: expected key=value pairs separated by commas, "
                             "e.g. batch=8,length=1024")
        shape[key] = int(value) if value.lstrip("-").isdigit() else value
    return shape


def warmup(spec: str, shapes: list[str], mode: str) -> None:
    factory = load_factory(spec)
    examples = [call_factory(spec, factory, parse_shape(shape)) for shape in shapes or [""]]
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
    options = _parser().parse_args(argv)
    try:
        return _run(options)
    except UsageError as error:
        return _fail(str(error), 2)
    except (OSError, ArchiveError, zipfile.BadZipFile) as error:
        return _fail(_describe(error), 1)


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _run(options: argparse.Namespace) -> int:
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


def _describe(error: Exception) -> str:
    """One line for a file error: "No such file or directory: x.zip" rather than "[Errno 2] ..."."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    return str(error)


def _fail(message: str, status: int) -> int:
    print(f"python -m compiler: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
