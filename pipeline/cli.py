"""`videomamba`: the command line. Each subcommand lives in one module that adds its own options and runs the job.

    videomamba synth     write the synthetic video-text corpus (the embedded default)
    videomamba shard     corpus manifest -> WebDataset tar shards, in parallel on Ray
    videomamba pretrain  stage 1 (masked alignment) or stage 2 (video-text) on DeepSpeed
    videomamba eval      zero-shot text<->video retrieval
    videomamba run       the whole pipeline from one config (`make demo`)
    videomamba bench     the benchmarks under bench/

Exit status: 0 when the job did what was asked (bad input that was counted and skipped included), 2 for a bad
command line or config (the message names the problem), 1 for a failure while working.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from pipeline.errors import ConfigError

# name -> (module that defines add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS = {
    "synth": ("shards.synth", "write a synthetic video-text corpus (moving shapes with captions that describe them)"),
    "shard": ("shards.cli", "shard a video/image-text corpus into WebDataset tars on a Ray cluster"),
    "pretrain": ("pipeline.stages.pretrain", "train stage 1 (masked alignment) or stage 2 (video-text) with DeepSpeed"),
    "eval": ("pipeline.stages.retrieval", "zero-shot text-video retrieval (R@1/5/10, MdR, MnR)"),
    "run": ("pipeline.orchestrate", "run the whole pipeline (synth -> shard -> stage 1 -> stage 2 -> eval)"),
    "bench": ("pipeline.bench", "run the benchmarks under bench/ and print their tables"),
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """Returns the parser; with `only`, just that subcommand's module is imported (the others stay unloaded)."""
    parser = argparse.ArgumentParser(
        prog="videomamba",
        description=__doc__.split("\n\n")[0],
        epilog="Run `videomamba COMMAND --help` for a command's options. " + __doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if only is not None and name != only:
            continue
        module = _import_subcommand(module_name)
        if module is None:
            p.description = f"{help_text}\n\n(not available in this build: {module_name} is missing)"
            continue
        if module.__doc__:
            p.description = module.__doc__.strip()
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def without_local_rank(argv: list[str]) -> list[str]:
    """Drops the `--local_rank N` that the deepspeed launcher puts before the subcommand (it also sets LOCAL_RANK,
    which the engine reads)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def _import_subcommand(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the subcommand's own module is absent, not one of its imports
            return None
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = without_local_rank(list(sys.argv[1:] if argv is None else argv))
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not hasattr(args, "_module"):
        print(f"videomamba {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(args._module.run(args) or 0)
    except ConfigError as e:
        print(f"videomamba {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"videomamba {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
