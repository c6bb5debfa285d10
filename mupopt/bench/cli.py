"""`mupopt bench`: the command line of the benchmark suite.

Wiring into mupopt/cli.py::

    from .bench import cli as bench_cli
    p = sub.add_parser("bench", help="time every optimizer x backend against torch peers")
    bench_cli.add_arguments(p)
    p.set_defaults(func=bench_cli.main)

Also runnable on its own: ``python -m mupopt.bench [options]``.
"""
from __future__ import annotations

import argparse
import sys

from .runner import OPTIMIZERS, Config


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .subjects import LIBRARIES, PEER_NAMES

    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small sizes and short timings: a few minutes on a 2-core CPU (the default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the sizes of docs/benchmarks.md on a GPU (GPT-2 small, Llama-1B, 2^26 elements); longer timings")
    size.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="tiny sizes, 2 repetitions, no torch.compile: checks the machinery in seconds (numbers meaningless)")
    parser.set_defaults(mode="quick")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--optimizers", type=_csv, default=None,
                        help=f"comma-separated subset of {','.join(OPTIMIZERS)} (default: all)")
    parser.add_argument("--backends", type=_csv, default=None,
                        help="comma-separated registry backends to time (default: every registered one)")
    parser.add_argument("--peers", type=_csv, default=None,
                        help=f"comma-separated peers of {','.join(PEER_NAMES)}, or a library ({', '.join(LIBRARIES)}) "
                             "for all of its peers; 'none' for none (default: all; a library that is not installed "
                             "gives skipped rows: pip install mupopt[peers])")
    parser.add_argument("--cases", type=_csv, default=None, help="comma-separated case names or prefixes (default: all)")
    parser.add_argument("--dtypes", type=_csv, default=["fp32", "bf16"], help="fp32,bf16 (default: both)")
    parser.add_argument("--compile-max-tensors", type=int, default=None,
                        help="time the torch.compile peer only on lists of at most this many tensors (default 1: "
                             "inductor unrolls the per-tensor loop, minutes of compilation for a 148-tensor list)")
    parser.add_argument("--compile-optimizers", type=_csv, default=None,
                        help="optimizers that get the torch.compile peer (default: adamw in --quick; all but "
                             "shampoo in --full, where compiling each takes 6-15 s per case)")
    parser.add_argument("--out", default=None,
                        help="folder for <device>-<date>.json/.csv/.png (default: $MUPOPT_BENCH_DIR or "
                             "~/.local/share/mupopt/bench; benchmarks/results in a checkout to record a run for "
                             "docs/benchmarks.md); '' to write nothing. An existing file of that name gets a "
                             "new name (-2, -3, ...) unless --force")
    parser.add_argument("--force", action="store_true", help="overwrite an existing result file of the same name")
    parser.add_argument("--note", default="", help="free text stored with every row (e.g. 'CPU shared with other jobs')")
    parser.add_argument("--keep-going", action="store_true",
                        help="record a failing correctness check and continue (exit status 1 at the end) instead of stopping")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no new case group after this many seconds (the first always runs); what was "
                             "measured is written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-q", "--no-progress", dest="progress", action="store_false", help="no progress output on stderr")


def config_from_args(args: argparse.Namespace) -> Config:
    peers = args.peers
    if peers is not None and [p.lower() for p in peers] == ["none"]:
        peers = []
    return Config(
        device=args.device, mode=args.mode, optimizers=args.optimizers, backends=args.backends, peers=peers,
        cases=args.cases, dtypes=tuple(args.dtypes), compile_max_tensors=args.compile_max_tensors,
        compile_optimizers=args.compile_optimizers,
        keep_going=args.keep_going, note=args.note, seed=args.seed, max_seconds=args.max_seconds,
    )


def main(args: argparse.Namespace) -> int:
    """Run, print the markdown table, write JSON/CSV (and a PNG when matplotlib is there).
    Exit status: 0, 1 when --keep-going recorded failures, 2 when a check stopped the run."""
    from . import report
    from .check import CheckFailed
    from .runner import run

    try:
        config = config_from_args(args)
        rows, failures = run(config, progress=args.progress)
    except CheckFailed as e:
        print(f"\nCORRECTNESS CHECK FAILED, run stopped (a benchmark of a wrong kernel is worthless):\n  {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.header(rows) + "\n")
    print(report.markdown_table(rows))
    out = report.default_out_dir() if args.out is None else args.out
    if out:
        json_path, csv_path = report.write_results(rows, out, force=getattr(args, "force", False))
        print(f"\nwrote {json_path} and {csv_path}", file=sys.stderr)
        png = json_path.with_suffix(".png")
        why_not = report.plot(rows, png)
        print(f"wrote {png}" if why_not is None else why_not, file=sys.stderr)
    if failures:
        print(f"\n{len(failures)} correctness check(s) FAILED:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mupopt bench", description="time every optimizer x backend against torch peers, "
                                                                      "each checked against the reference first")
    add_arguments(parser)
    return main(parser.parse_args(argv))
