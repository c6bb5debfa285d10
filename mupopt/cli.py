"""The `mupopt` command: `verify`, `bench`, `coord-check`, `transfer`."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _verify(args) -> int:
    from . import verify

    devices = None if args.device == "auto" else [args.device]
    if args.device.startswith("cuda") and not torch_cuda_available():
        print(f"mupopt verify: --device {args.device}: no CUDA device here (torch.cuda.is_available() is False); "
              "use --device cpu or auto", file=sys.stderr)
        return 2
    progress = (lambda msg: print(f"  checking {msg}", file=sys.stderr)) if args.verbose else None
    try:
        rows = verify.run(devices, steps=args.steps, progress=progress, optimizers=args.optimizer,
                          backend_names=args.backend)
    except ValueError as err:
        print(f"mupopt verify: {err}", file=sys.stderr)
        return 2
    print(verify.format_rows(rows))
    print()
    print(verify.format_unchecked(verify.unchecked(devices, args.optimizer, args.backend),
                                  selected=bool(args.optimizer or args.backend)))
    for entry in verify.OPTIMIZERS:
        if args.optimizer and entry.name not in args.optimizer:
            continue
        problem = verify.reference_problem(entry.reference_module)
        if entry.reference_module is not None and problem is not None:
            print(f"{entry.name}: not checked against {entry.reference_module}: {problem}")
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mupopt", description="muP-scaled optimizers: tools (also `python -m mupopt`)")
    parser.add_argument("--version", action="version", version=f"mupopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every optimizer and backend available here against its reference")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cpu, plus cuda when present)")
    p.add_argument("--steps", type=int, default=10, help="training steps per check (default 10)")
    p.add_argument("--optimizer", action="append", metavar="NAME",
                   help="check only this optimizer (repeatable; default: all)")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="check only this backend (repeatable; default: all registered), e.g. "
                        "TRITON_INTERPRET=1 mupopt verify --device cpu --backend triton")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print each check as it starts")
    p.set_defaults(func=_verify)

    from .bench import cli as bench_cli

    p = sub.add_parser("bench", help="time every optimizer x backend against the torch peers")
    bench_cli.add_arguments(p)
    p.set_defaults(func=bench_cli.main)

    from .mupcheck import coord_check, transfer

    p = sub.add_parser("coord-check", help="coordinate check, SP vs muP, for the mupopt optimizers")
    coord_check.add_arguments(p)
    p.set_defaults(func=coord_check.main)
    p = sub.add_parser("transfer", help="learning-rate transfer across widths on a char GPT")
    transfer.add_arguments(p)
    p.set_defaults(func=transfer.main)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
