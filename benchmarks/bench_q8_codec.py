"""Format 8's block codec alone (issue 20 item 6): ns per element of the AVX-512 VBMI encode and
decode (csrc/cpu/q8_vbmi.h) on one thread, L2-resident blocks, for every map and kind; and its
check against the plain codec on float32 patterns of [-1, 1] (all of them with ``--check 1``).

    python benchmarks/bench_q8_codec.py [--baseline /work/main] [--rounds 3] [--reps 300]
                                        [--check STEP]

Compiles benchmarks/q8_codec_standalone.cpp with g++ and the library's flags against this
checkout's csrc/ (and, with ``--baseline``, another checkout's, with that checkout's map tables),
then runs the builds alternately, ``--rounds`` times: the ratio of each round pairs two runs
seconds apart, so a change of the machine's load hits both alike. Prints the load average: on a
shared machine say "measured under load". Needs a CPU with AVX-512 VBMI (Ice Lake or later).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAPS = [(name, kind) for name in ("dynamic", "linear-sqrt") for kind in ("signed", "unsigned")]
DUMP = """
import sys
from mupopt.kernels.cpp.ops import map_table
for name, kind in {maps!r}:
    map_table(kind, name).numpy().tofile(f"{{sys.argv[1]}}/{{name}}-{{kind}}.bin")
"""


def build(checkout: str, out: str) -> str:
    """The standalone codec of ``checkout``'s csrc/ and its map tables, in ``out``."""
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=checkout)
    subprocess.run([sys.executable, "-c", DUMP.format(maps=MAPS), out], env=env, cwd=checkout, check=True)
    from mupopt.kernels.cpp.build import CXX_FLAGS

    with open(os.path.join(checkout, "csrc/include/mupopt/storage.h")) as f:
        lines = ["-DMUPOPT_RANK_LINES"] if "const float* lines" in f.read() else []
    exe = os.path.join(out, "codec")
    flags = [f for f in CXX_FLAGS if f != "-fopenmp"]
    subprocess.run(["g++", "-std=c++17", *flags, *lines, f"-I{checkout}/csrc/include", f"-I{checkout}/csrc/cpu",
                    os.path.join(HERE, "q8_codec_standalone.cpp"), "-o", exe], check=True)
    return exe


def run(exe: str, out: str, mode: str, name: str, kind: str, arg: int) -> tuple[int, str]:
    p = subprocess.run([exe, mode, f"{out}/{name}-{kind}.bin", str(arg)], capture_output=True, text=True)
    return p.returncode, p.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="another checkout (its csrc/ and map tables) to pair with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--check", type=int, help="check every STEP-th pattern of [-1, 1] instead of timing")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        builds = {"this": (build(ROOT, f"{tmp}/this"), f"{tmp}/this")}
        if args.check is not None:
            failed = False
            for name, kind in MAPS:
                rc, text = run(*builds["this"], "check", name, kind, args.check)
                print(f"{name:12s} {kind:9s} {text}")
                failed |= rc != 0
            sys.exit(1 if failed else 0)
        if args.baseline:
            builds["baseline"] = (build(os.path.abspath(args.baseline), f"{tmp}/baseline"), f"{tmp}/baseline")
        print(f"load average before: {os.getloadavg()}")
        for name, kind in MAPS:
            times = {which: [] for which in builds}
            for _ in range(args.rounds):
                for which, (exe, out) in builds.items():
                    _, text = run(exe, out, "bench", name, kind, args.reps)
                    enc, dec = (float(v) for v in text.split()[1::2])
                    times[which].append((enc, dec))
            line = f"{name:12s} {kind:9s}"
            for which, ts in times.items():
                line += f" | {which}: encode {min(t[0] for t in ts):.3f} decode {min(t[1] for t in ts):.3f} ns"
            if "baseline" in times:
                ratio = statistics.median(b[0] / t[0] for b, t in zip(times["baseline"], times["this"]))
                line += f" | encode baseline/this {ratio:.2f}x (median of rounds)"
            print(line)
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
