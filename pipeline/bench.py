"""Run the benchmarks under bench/ (each a module of the `bench` package, `python -m bench.NAME`, that prints a markdown
table).

Examples:
  videomamba bench                     every benchmark with its quick CPU settings
  videomamba bench scan backbone       just these two
  videomamba bench data -- --frames 8  arguments after `--` go to the benchmark script

Results measured on the CPU machines and the lent H100 are kept in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "bench")


def available() -> list[str]:
    """Returns the benchmark names: the modules in bench/."""
    if not os.path.isdir(BENCH_DIR):
        return []
    return sorted(f[:-3] for f in os.listdir(BENCH_DIR) if f.endswith(".py") and not f.startswith("_"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--full", action="store_true", help="the scripts' full settings instead of --quick")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="after `--`: arguments for the scripts")


def run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError

    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {unknown}; available: {available()}")
    extra = [a for a in args.script_args if a != "--"]
    failed = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}"] + ([] if args.full else ["--quick"]) + extra
        print(f"## {name}\n$ {' '.join(cmd)}", flush=True)
        if subprocess.call(cmd, env=env) != 0:
            failed.append(name)
    if failed:
        print(f"videomamba bench: failed: {failed}", file=sys.stderr)
        return 1
    return 0
