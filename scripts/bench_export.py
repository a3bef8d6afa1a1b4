"""Benchmark `sam-onnx export`: wall time, graph-writing time and peak RSS per model type.

Each run is a fresh `sam-onnx export` process (its peak RSS read from wait4), exporting from
a checkpoint of random weights saved as .pth and loaded through the normal checkpoint path.

    python scripts/bench_export.py --model vit_b --model vit_h --repeat 3 --out bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def random_checkpoint(model_type: str, folder: Path) -> Path:
    """Save random weights built by the family's own builder as a real checkpoint file (once)."""
    path = folder / f"random_{model_type}.pth"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        code = ("import torch,sys; from sam_onnx.exporter.checkpoints import build; "
                "torch.save(build(sys.argv[1]).state_dict(), sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, model_type, str(path)], check=True)
    return path


def run_once(model_type: str, checkpoint: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "sam_onnx.cli", "export", "--model", model_type,
           "--checkpoint", str(checkpoint), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export failed:\n{output}")
    manifest = json.loads((out / f"{model_type}_manifest.json").read_text())
    weight_bytes = sum(size for g in manifest["graphs"] for name, size in g["files"].items())
    return {
        "wall_s": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "graph_files_bytes": weight_bytes,
        "stages_s": manifest["exports"][-1]["timings_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sam-onnx-bench")
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for model_type in args.model:
        ckpt = random_checkpoint(model_type, args.work)
        import torch

        weight_bytes = sum(t.numel() * t.element_size()
                           for t in torch.load(ckpt, mmap=True, weights_only=True).values())
        runs = [run_once(model_type, ckpt, args.work / "out") for _ in range(args.repeat)]
        row = {
            "weight_bytes": weight_bytes,
            "runs": runs,
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_graph_writing_s": statistics.median(  # each family's contracts' stages
                sum(t for stage, t in r["stages_s"].items() if stage.startswith("export "))
                for r in runs),
            "median_peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs),
        }
        row["peak_rss_over_weights"] = row["median_peak_rss_bytes"] / weight_bytes
        results[model_type] = row
        print(f"{model_type}: wall {row['median_wall_s']:.1f} s, graph writing "
              f"{row['median_graph_writing_s']:.1f} s, peak RSS "
              f"{row['median_peak_rss_bytes'] / 2**30:.2f} GiB = "
              f"{row['peak_rss_over_weights']:.2f}x weights ({weight_bytes / 2**30:.2f} GiB), "
              f"n={len(runs)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
