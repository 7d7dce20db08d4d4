"""How fast a one-token float32 GEMV streams its weights on this CPU, by read pattern.

Builds ``benchmarks/csrc/gemv_streams.cpp`` (it includes the native kernels' source) with the native kernels'
compiler and flags, runs it with the CPU's threads over a buffer of rows of 576 floats (SmolLM2's hidden size),
and writes one table: each variant's median GB/s and its median ratio to a one-stream-per-thread vector sum timed
in the same round ([min–max] over rounds). It is the measurement behind the engine's far-rows GEMV and behind
the read-bandwidth probe that keeps the faster of torch ``sum`` and a four-stream read (see the kernels guide).

    python benchmarks/gemv_streams.py                 # 256 MiB, 15 rounds (~1 min)
    python benchmarks/gemv_streams.py --mib 64 --rounds 3 --no-table   # a quick check
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import machine_load, simd_flags, table_header, write_table  # noqa: E402

from effinfer.kernels import native  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "csrc" / "gemv_streams.cpp"
NODE = "system.inference_engine.graph_operator.linear_operator"


def build(directory: Path) -> Path:
    cxx = native.compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler found (set $CXX or install g++)")
    flags = [f for f in native.FLAGS if f not in ("-shared", "-fPIC")]
    binary = directory / "gemv_streams"
    result = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(binary)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{cxx} failed on {SOURCE.name}: {result.stderr[-2000:]}")
    return binary


def run(binary: Path, mib: int, rounds: int, threads: int) -> list[dict[str, float | str]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    output = subprocess.run([str(binary), str(mib), str(rounds)], capture_output=True, text=True, env=env,
                            check=True).stdout
    rows = []
    for line in output.strip().splitlines():
        name, pages, gbs, ratio, low, high = line.split("\t")
        rows.append({"variant": name, "pages": pages, "gb_s": float(gbs), "ratio": float(ratio), "low": float(low),
                     "high": float(high)})
    return rows


def markdown(rows: list[dict[str, float | str]], args: argparse.Namespace, load: tuple[str, str]) -> str:
    lines = table_header("One-token float32 GEMV: how fast each read pattern streams the weights",
                         "python benchmarks/gemv_streams.py " + " ".join(sys.argv[1:]), args.threads,
                         f"; vector extensions: {simd_flags()}; machine load before `{load[0]}`, after `{load[1]}`")
    lines += [f"{args.mib} MiB of rows of 576 floats, twice: in 4 KiB pages and in transparent huge pages (2 MiB, "
              f"`MADV_HUGEPAGE`, as the engine keeps its weights); {args.rounds} rounds; in each round every variant "
              "reads each buffer once, in the order listed. ratio = the variant's GB/s ÷ the one-stream sum's over the "
              "same pages in the same round, median [min–max]. `x` is the input vector; the far-apart rows are row *i* "
              "of each of the S equal parts of a thread's share.", "",
              "| read pattern | GB/s, 4 KiB pages | × one-stream sum | GB/s, huge pages | × one-stream sum |",
              "|---|---|---|---|---|"]
    by_variant: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_variant.setdefault(str(row["variant"]), {})[str(row["pages"])] = row
    for variant, pages in by_variant.items():
        cells = [f"{r['gb_s']:.1f} | {r['ratio']:.2f} [{r['low']:.2f}–{r['high']:.2f}]" for r in pages.values()]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="buffer size (well past the last-level cache)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-table", action="store_true", help="print the table, do not write it")
    args = parser.parse_args()
    before = machine_load()
    with tempfile.TemporaryDirectory() as scratch:
        rows = run(build(Path(scratch)), args.mib, args.rounds, args.threads)
    table = markdown(rows, args, (before, machine_load()))
    if not args.no_table:
        print("wrote", write_table(NODE, "gemv_streams", table))
    print(table)


if __name__ == "__main__":
    main()
