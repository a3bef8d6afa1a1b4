"""Benchmark `sam-onnx validate` on big graphs: wall time and peak RSS per run.

Validation reads only the protobuf (external weights are checked for size, never loaded),
so a vit_h encoder with 2.5 GB of weights must validate in under 2 s and 300 MB.

    python scripts/bench_validate.py exported/vit_h_encoder.onnx --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_once(models) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sam_onnx.cli", "validate", *map(str, models)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return {"wall_s": time.perf_counter() - start, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "exit_code": os.waitstatus_to_exitcode(status)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    weights = sum(p.stat().st_size for m in args.models for p in m.parent.glob(m.name + "*"))
    runs = [run_once(args.models) for _ in range(args.repeat)]
    row = {"models": [str(m) for m in args.models], "bytes_on_disk": weights, "runs": runs,
           "median_wall_s": statistics.median(r["wall_s"] for r in runs),
           "median_peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs)}
    print(f"validate {' '.join(m.name for m in args.models)} ({weights / 2**30:.2f} GiB on disk): "
          f"median {row['median_wall_s']:.2f} s, peak RSS "
          f"{row['median_peak_rss_bytes'] / 2**20:.0f} MiB, n={len(runs)}, "
          f"exit codes {sorted({r['exit_code'] for r in runs})}")
    if args.out:
        args.out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
