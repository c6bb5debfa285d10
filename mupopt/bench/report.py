"""Results on disk and on screen: JSON and CSV in one schema, a markdown table, a PNG plot, and the
results section of docs/benchmarks.md regenerated from every result file in benchmarks/results/.

    python -m mupopt.bench.report --doc [docs/benchmarks.md] [--results benchmarks/results]

replaces the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` in that file.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

from .runner import COLUMNS, ELEMENTWISE, Row, rows_as_dicts

START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"
DEFAULT_RESULTS = Path("benchmarks") / "results"
DEFAULT_DOC = Path("docs") / "benchmarks.md"
PEAK_NOTE = (
    "% of peak is of the copy bandwidth (GB/s rows) or the matmul rate (TFLOP/s rows) measured in the "
    "same run on buffers larger than the caches; a case whose tensors fit in the CPU's caches (or a "
    "GPU's L2) moves its bytes faster than that, hence values above 100."
)
BOUND_NOTE = (
    "% of bound (CPU) is the time the same optimizer's bytes take with no math (the \"no-math bound\" "
    "rows: its passes through the cpu backend's own traversal, csrc/cpu/traffic.cpp, on tensors of "
    "the same case, timed just before) over the row's time."
)


def default_out_dir() -> Path:
    """Where `mupopt bench` writes by default: ``$MUPOPT_BENCH_DIR``, else
    ``$XDG_DATA_HOME/mupopt/bench`` (``~/.local/share/mupopt/bench``): a user folder, never the
    working directory or a checkout's tracked files."""
    if os.environ.get("MUPOPT_BENCH_DIR"):
        return Path(os.environ["MUPOPT_BENCH_DIR"])
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "mupopt" / "bench"

OTHER_RATIOS = (
    ("ratio_to_torch_foreach", "foreach"),
    ("ratio_to_adamw", "our AdamW"),
    ("ratio_to_uniform_lr", "uniform lr"),
    ("ratio_to_torch_muon", "torch Muon"),
    ("ratio_to_torch_ns", "torch NS"),
    ("ratio_to_eigh_loop", "eigh loop"),
)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def result_stem(rows: Sequence[Row | dict]) -> str:
    """``cpu-2026-11-23`` / ``nvidia-h100-80gb-hbm3-2026-11-23``: device and date of the run."""
    first = _as_dict(rows[0]) if rows else {}
    device = first.get("device", "cpu")
    if device == "cuda":
        device = "".join(c if c.isalnum() else "-" for c in first.get("device_name", "cuda").lower()).strip("-")
        while "--" in device:
            device = device.replace("--", "-")
    date = (first.get("date") or "")[:10] or "undated"
    stem = f"{device}-{date}"
    mode = first.get("mode")
    return stem if mode in (None, "", "quick") else f"{stem}-{mode}"


def write_results(rows: Sequence[Row], out_dir: str | os.PathLike, stem: str | None = None,
                  *, force: bool = False) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (a list of rows) and ``<stem>.csv`` (same columns) into out_dir.
    An existing result of that name is never overwritten unless ``force``: the stem then gets
    the first free suffix ``-2``, ``-3``, ..."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or result_stem(rows)
    if not force:
        base, n = stem, 1
        while any((out / f"{stem}{ext}").exists() for ext in (".json", ".csv", ".png")):
            n += 1
            stem = f"{base}-{n}"
    # JSON has no NaN or infinity: a non-finite number is written as null (empty in the CSV).
    dicts = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()} for d in rows_as_dicts(rows)]
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    with open(json_path, "w") as f:
        json.dump(dicts, f, indent=1, allow_nan=False)
        f.write("\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for d in dicts:
            writer.writerow({k: ("" if v is None else v) for k, v in d.items()})
    return json_path, csv_path


def load_results(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or (rows and not isinstance(rows[0], dict)):
        raise ValueError(f"{path}: expected a JSON list of result rows")
    return rows


def _as_dict(row: Row | dict) -> dict:
    return row if isinstance(row, dict) else row.__dict__


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _num(x, digits: int = 3) -> str:
    if x is None or x == "":
        return ""
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _ratio(x) -> str:
    return "" if x is None or x == "" else f"{float(x):.2f}x"


def _rate(d: dict) -> str:
    if str(d.get("case", "")).startswith("overhead-") and d.get("median_ms") and d.get("tensors"):
        return f"{_num(1e3 * float(d['median_ms']) / int(d['tensors']))} us/tensor"  # host time, issue 15
    if d.get("gbps") is not None:
        return f"{_num(d['gbps'])} GB/s"
    if d.get("tflops") is not None:
        return f"{_num(d['tflops'])} TFLOP/s"
    return ""


def _target(d: dict) -> str:
    if not d.get("target"):
        return ""
    return ("met: " if d.get("meets_target") else "NOT met: ") + d["target"]


def markdown_table(rows: Iterable[Row | dict], *, with_skipped: bool = True) -> str:
    """One line per measured row; skipped and failed rows listed below, one line per reason."""
    dicts = [_as_dict(r) for r in rows]
    ok = [d for d in dicts if d.get("status") == "ok"]
    lines = [
        "| optimizer | case | dtype | backend | median ms (p20-p80) | throughput | % of peak | % of bound | vs torch fused | vs compile | vs reference | other ratios | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in ok:
        others = "; ".join(f"{label} {_ratio(d[c])}" for c, label in OTHER_RATIOS if d.get(c) is not None)
        backend = d["backend"] if d.get("kind") != "peer" else f"*{d['backend']}*"
        lines.append(
            f"| {d['optimizer']} | {d['case']} | {d['dtype']} | {backend} | {_num(d['median_ms'])} ({_num(d['p20_ms'])}-{_num(d['p80_ms'])}) "
            f"| {_rate(d)} | {_num(d.get('pct_of_peak'), 2)} | {_num(d.get('pct_of_bound'), 2)} | {_ratio(d.get('ratio_to_torch_fused'))} | {_ratio(d.get('ratio_to_compile'))} "
            f"| {_ratio(d.get('ratio_to_reference'))} | {others} | {_target(d)} |"
        )
    text = "\n".join(lines)
    if any((d.get("pct_of_peak") or 0) > 100 for d in ok):
        text += "\n\n" + PEAK_NOTE
    if any(d.get("pct_of_bound") is not None for d in ok):
        text += "\n\n" + BOUND_NOTE
    if with_skipped:
        notes = skipped_summary(dicts)
        if notes:
            text += "\n\nNot measured:\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


def skipped_summary(dicts: Sequence[dict]) -> list[str]:
    """Skipped and failed rows grouped by (backend, status, reason)."""
    groups: dict[tuple, list[str]] = {}
    for d in dicts:
        if d.get("status") in ("skipped", "failed"):
            groups.setdefault((d["backend"], d["status"], d.get("notes", "")), []).append(f"{d['optimizer']} {d['case']} {d['dtype']}")
    out = []
    for (backend, status, notes), where in groups.items():
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        out.append(f"{backend} {status} ({shown}): {notes}")
    return out


def header(rows: Sequence[Row | dict]) -> str:
    d = _as_dict(rows[0])
    loads = [r.get("load_avg") for r in map(_as_dict, rows) if r.get("load_avg") is not None]
    load = f"; 1-min load average {min(loads):.1f}-{max(loads):.1f} during the run" if loads else ""
    note = f"; note: {d['run_note']}" if d.get("run_note") else ""
    return (f"{d.get('device_name', '')} ({d.get('device', '')}, {d.get('threads', '')} torch threads), {d.get('date', '')}, "
            f"mode {d.get('mode', '')}, torch {d.get('torch', '')}, triton {d.get('triton') or 'absent'}, host {d.get('host', '')}"
            f"{load}{note}")


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
def plot(rows: Sequence[Row | dict], path: str | os.PathLike) -> str | None:
    """Throughput against size, one line per backend and dtype, one panel per optimizer.
    Returns None when written, else why not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    dicts = [_as_dict(r) for r in rows if _as_dict(r).get("status") == "ok"]
    dicts = [d for d in dicts if d.get("kind") != "peak" and not d["case"].endswith((".mup", ".uniform"))]
    optimizers = list(dict.fromkeys(d["optimizer"] for d in dicts))
    if not optimizers:
        return "no measured rows to plot"
    copy = next((_as_dict(r) for r in rows if _as_dict(r).get("optimizer") == "copy" and _as_dict(r).get("gbps")), None)
    cols = min(3, len(optimizers))
    nrows = math.ceil(len(optimizers) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, opt in zip(axes.flat, optimizers):
        mine = [d for d in dicts if d["optimizer"] == opt]
        elementwise = opt in ELEMENTWISE
        key = "gbps" if elementwise else "tflops"
        for (backend, dtype) in dict.fromkeys((d["backend"], d["dtype"]) for d in mine):
            pts = sorted((d["numel"], d[key]) for d in mine if d["backend"] == backend and d["dtype"] == dtype and d.get(key))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if dtype == "fp32" else "--",
                        label=f"{backend} {dtype}")
        if elementwise and copy:
            ax.axhline(copy["gbps"], color="gray", linestyle=":", label=f"copy {copy['gbps']:.1f} GB/s (start of run)")
        ax.set_xscale("log")
        ax.set_title(opt)
        ax.set_xlabel("elements per step")
        ax.set_ylabel("GB/s (bytes model)" if elementwise else "TFLOP/s")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(optimizers):]:
        ax.axis("off")
    d0 = _as_dict(rows[0])
    fig.suptitle(f"{d0.get('device_name', '')}, {(d0.get('date') or '')[:10]}, mode {d0.get('mode', '')}, torch {d0.get('torch', '')} "
                 f"(solid fp32, dashed bf16; dotted: copy bandwidth)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------
# docs/benchmarks.md
# --------------------------------------------------------------------------------------------
def headline(dicts: Sequence[dict]) -> list[dict]:
    """Per (optimizer, case, dtype): our fastest compiled backend, else the reference; fp32 only,
    the one-tensor and model-list cases and the matrix parts."""
    best: dict[tuple, dict] = {}
    for d in dicts:
        if d.get("status") != "ok" or d.get("kind") != "mupopt" or d.get("dtype") not in ("fp32", "bf16"):
            continue
        if d["optimizer"] in ELEMENTWISE and not (d["case"] == "large" or d["case"].startswith("llama") or d["case"].endswith(".mup")):
            continue
        if d["dtype"] != "fp32" and d["optimizer"] not in ("ns", "muon"):
            continue
        key = (d["optimizer"], d["case"], d["dtype"])
        cur = best.get(key)
        rank = (d["backend"] != "reference", -d["median_ms"])
        if cur is None or rank > (cur["backend"] != "reference", -cur["median_ms"]):
            best[key] = d
    return list(best.values())


def peer_table(rows: Iterable[Row | dict]) -> str:
    """Ours against the public peers (torch's optimizers and the libraries of subjects.PEERS), per
    optimizer, case and dtype where a peer was measured: our fastest backend (the reference only
    when nothing else ran), the fastest peer, and peer time / our time (> 1: ours is faster;
    the rows were timed in the same rounds, Runner._subject). "same" / "different": the peer's
    variant against ours (measure.equivalence: its notes in the result file give the numbers);
    a variant that did not hold in the run says so. "" when the run has no peer rows."""
    from .subjects import PEERS_BY_NAME

    dicts = [_as_dict(r) for r in rows]
    ok = [d for d in dicts if d.get("status") == "ok" and d.get("median_ms")]
    keys = list(dict.fromkeys((d["optimizer"], d["case"], d["dtype"]) for d in ok
                              if d.get("kind") == "peer" and d["backend"] in PEERS_BY_NAME))
    if not keys:
        return ""
    lines = ["| optimizer | case | dtype | ours (ms) | best public peer (ms) | peer time / ours | its variant | other peers (time / ours) |",
             "|---|---|---|---|---|---|---|---|"]
    for opt, case, dtype in keys:
        same = [d for d in ok if (d["optimizer"], d["case"], d["dtype"]) == (opt, case, dtype)]
        mine = [d for d in same if d.get("kind") == "mupopt"]
        compiled = [d for d in mine if d["backend"] != "reference"]
        peers = sorted((d for d in same if d.get("kind") == "peer" and d["backend"] in PEERS_BY_NAME),
                       key=lambda d: d["median_ms"])
        if not mine or not peers:
            continue
        ours = min(compiled or mine, key=lambda d: d["median_ms"])
        best, others = peers[0], peers[1:]
        ratio = lambda d: f"{d['median_ms'] / ours['median_ms']:.2f}x"  # noqa: E731
        lines.append(f"| {opt} | {case} | {dtype} | {ours['backend']} {_num(ours['median_ms'])} | {_peer_name(best)} "
                     f"{_num(best['median_ms'])} | {ratio(best)} | {_variant(best, PEERS_BY_NAME)} | "
                     + "; ".join(f"{_peer_name(d)} {ratio(d)} ({_variant(d, PEERS_BY_NAME)})" for d in others) + " |")
    differ = {d["backend"] for d in ok if d.get("kind") == "peer" and d["backend"] in PEERS_BY_NAME
              and not PEERS_BY_NAME[d["backend"]].same_variant}
    notes = [f"- {name}: {PEERS_BY_NAME[name].differs}" for name in sorted(differ)]
    not_run = {(d["backend"], d.get("notes", "")) for d in dicts if d.get("kind") == "peer" and d["backend"] in PEERS_BY_NAME
               and d.get("status") in ("skipped", "failed")}
    notes += [f"- {name} not measured: {why}" for name, why in sorted(not_run)]
    return "\n".join(lines) + ("\n\nDifferent variants, and peers not measured:\n\n" + "\n".join(notes) if notes else "")


def _peer_name(d: dict) -> str:
    return d["backend"] + (" (eager)" if "eager (" in d.get("notes", "") else "")


def _variant(d: dict, registry: dict) -> str:
    """The peer's declared variant, or what the run found against it: MISMATCH (declared the same,
    differs in float64), MISLABELLED (declared different, matches), or the same variant whose
    check on this case's tensors failed (bf16 rounding, usually: its notes say by how much)."""
    notes = d.get("notes", "")
    for flag in ("MISMATCH: declared", "MISLABELLED"):
        if flag in notes:
            return flag.split(":")[0]
    if not registry[d["backend"]].same_variant:
        return "different"
    return "same, but its check on this case failed" if "MISMATCH vs reference" in notes else "same"


def readme_section(results_dir: str | os.PathLike = DEFAULT_RESULTS, link_base: str | None = None,
                   include_smoke: bool = False) -> str:
    """The text between the markers (docs/benchmarks.md): a table of result files (device, date, mode), then per
    file a headline table and the full table folded. Links to the files start with ``link_base``
    (default: ``results_dir`` as given). Smoke runs (numbers without meaning) are left out."""
    files = sorted(Path(results_dir).glob("*.json"))
    base = (link_base if link_base is not None else Path(results_dir).as_posix()).rstrip("/")
    out = [
        "Generated by `python -m mupopt.bench.report --doc` from "
        f"`{base}/` (edit the results, not this text). Ratios are peer time / our time "
        "(> 1: ours is faster), measured side by side in one run. " + PEAK_NOTE + " " + BOUND_NOTE,
        "",
    ]
    runs = []
    for path in files:
        rows = load_results(path)
        if rows and (include_smoke or rows[0].get("mode") != "smoke"):
            runs.append((path, rows))
    if not runs:
        return "\n".join(out + ["No results recorded yet."])
    out += ["| results | device | date | mode | torch | triton | note |", "|---|---|---|---|---|---|---|"]
    for path, rows in runs:
        d = rows[0]
        out.append(f"| [{path.name}]({base}/{path.name}) | {d.get('device_name', '')} | {(d.get('date') or '')[:10]} "
                   f"| {d.get('mode', '')} | {d.get('torch', '')} | {d.get('triton') or 'absent'} | {d.get('run_note', '')} |")
    for path, rows in runs:
        d = rows[0]
        out += ["", f"#### {d.get('device_name', '')}, {(d.get('date') or '')[:10]} ({d.get('mode', '')})", "", header(rows), ""]
        peaks = [r for r in rows if r.get("kind") == "peak" and r.get("status") == "ok"]
        if peaks:
            out.append("Peaks measured in this run: " + ", ".join(
                f"{r['optimizer']} {r['dtype'] if r['optimizer'] == 'matmul' else ''} {_rate(r)}".replace("  ", " ") for r in peaks) + ".")
            out.append("")
        peers = peer_table(rows)
        if peers:
            out += ["Against the public peers (peer time / our time, > 1: ours is faster):", "", peers, ""]
        out.append(markdown_table(headline(rows), with_skipped=False))
        out += ["", "<details><summary>All rows of this run</summary>", "", markdown_table(rows), "", "</details>"]
    return "\n".join(out)


def update_readme(readme: str | os.PathLike, results_dir: str | os.PathLike = DEFAULT_RESULTS,
                  include_smoke: bool = False) -> bool:
    """Replace the text between the markers; returns whether the file changed. Raises ValueError
    when the markers are missing or out of order."""
    path = Path(readme)
    text = path.read_text()
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"{path}: needs the markers {START_MARKER} and {END_MARKER}, in that order")
    link_base = Path(os.path.relpath(Path(results_dir).resolve(), path.resolve().parent)).as_posix()
    new = text[: start + len(START_MARKER)] + "\n" + readme_section(results_dir, link_base, include_smoke) + "\n" + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mupopt.bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--doc", nargs="?", const=str(DEFAULT_DOC), default=None, metavar="MD",
                        help=f"markdown file to update between the results markers (default {DEFAULT_DOC.as_posix()})")
    parser.add_argument("--readme", dest="doc", help=argparse.SUPPRESS)  # the former name
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="folder of result JSON files (default benchmarks/results)")
    parser.add_argument("--print", dest="show", metavar="JSON", help="print the markdown table of one result file")
    parser.add_argument("--plot", metavar="JSON", help="(re)draw the PNG beside one result file")
    args = parser.parse_args(argv)
    if args.plot:
        png = Path(args.plot).with_suffix(".png")
        why_not = plot(load_results(args.plot), png)
        print(f"wrote {png}" if why_not is None else why_not)
    if args.show:
        rows = load_results(args.show)
        print(header(rows) + "\n\n" + markdown_table(rows))
    if args.doc:
        try:
            changed = update_readme(args.doc, args.results)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{args.doc}: {'updated' if changed else 'already up to date'}")
    if not (args.doc or args.show or args.plot):
        print(readme_section(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
