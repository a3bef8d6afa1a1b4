"""Benchmark ``sam-onnx segment`` over a folder of images: the local engine (one process, and
two worker processes) against Ray Data (one actor, and two), threads split among workers.

Each configuration is one fresh ``sam-onnx segment`` command into an empty folder (Ray's
start and stop included: it is what a user waits for), the configurations alternating round
by round; images per minute are medians over the rounds. A sampler reads every process of
the run's tree from /proc each 0.2 s: the peak RSS of each worker process (Ray's actors, the
local pool's workers, or the one process) is reported.

    python scripts/bench_dataset.py --model vit_t --images 24 --rounds 2 \
        --out docs/bench_dataset.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "images"
CONFIGS = {"local, 1 process": ["--engine", "local", "--workers", "1"],
           "local, 2 processes": ["--engine", "local", "--workers", "2"],
           "ray, 1 actor": ["--engine", "ray", "--workers", "1"],
           "ray, 2 actors": ["--engine", "ray", "--workers", "2"],
           # one thread a worker: how the work scales with workers, cores aside
           "local, 1 process, 1 thread": ["--engine", "local", "--workers", "1", "--threads", "1"],
           "ray, 1 actor, 1 thread": ["--engine", "ray", "--workers", "1", "--threads", "1"],
           "ray, 2 actors, 1 thread each": ["--engine", "ray", "--workers", "2", "--threads",
                                            "1"]}


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """Crops of the shared images at several sizes, and synthetic images for the rest."""
    from PIL import Image

    from sam_onnx.runtime.images import load_image, synthetic

    rng = np.random.default_rng(seed)
    sources = [load_image(p) for p in sorted(IMAGES.glob("*.jpg"))] if IMAGES.exists() else []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if sources and i % 4:
            src = sources[i % len(sources)]
            h, w = src.shape[:2]
            ch, cw = int(h * rng.uniform(0.4, 1)), int(w * rng.uniform(0.4, 1))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            image = src[y:y + ch, x:x + cw]
        else:
            image = synthetic(int(rng.integers(300, 900)), int(rng.integers(300, 900)))
        Image.fromarray(image).save(folder / f"image{i:03d}.jpg", quality=92)


def _tree(root: int) -> list:
    """The pids of ``root`` and all its descendants."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _sample(proc: subprocess.Popen, peaks: dict, stop: threading.Event) -> None:
    """Peak RSS (GiB) and command line of every process in the run's tree; Ray's own
    processes (GCS, raylet, dashboard) are in another tree and not counted."""
    while not stop.is_set():
        for pid in _tree(proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:80]
            except OSError:
                continue
            rss = next((int(line.split()[1]) for line in status.splitlines()
                        if line.startswith("VmRSS:")), 0) / 2**20
            if rss > peaks.get(pid, (0, ""))[0]:
                peaks[pid] = (rss, cmd)
        stop.wait(0.2)


def run(config: list, folder: Path, encoder: Path, decoder: Path, out: Path) -> dict:
    peaks: dict = {}
    stop = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sam_onnx.cli", "segment", str(folder),
                             "--encoder", str(encoder), "--decoder", str(decoder), "--out",
                             str(out), "--providers", "cpu", *config],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=_sample, args=(proc, peaks, stop))
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed: {stderr[-2000:]}")
    workers = {pid: rss for pid, (rss, cmd) in peaks.items()  # not the pool's resource
               if ("MapWorker" in cmd or "multiprocessing" in cmd) and rss > 0.05}  # tracker
    if not workers:  # one process does the work
        workers = {proc.pid: peaks.get(proc.pid, (0, ""))[0]}
    summary = stdout.strip().splitlines()[-1]
    return {"wall_s": wall, "summary": summary,
            "worker_peak_rss_gib": sorted(workers.values(), reverse=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--graphs", type=Path, default=Path("/tmp/sam-onnx-bench/dataset"))
    parser.add_argument("--only", help="Run the configurations whose name has this text.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if not args.only or args.only in k}

    import sam_onnx
    from sam_onnx.core.files import atomic_write

    encoder = args.graphs / f"{args.model}_encoder.onnx"
    decoder = args.graphs / f"{args.model}_decoder_batched.onnx"
    if not decoder.exists():
        sam_onnx.export(args.model, random_weights=True, out_dir=args.graphs,
                        decoder_contract="batched")
    rows = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_images(folder, args.images)
        for r in range(args.rounds):
            for i, (name, config) in enumerate(configs.items()):
                result = run(config, folder, encoder, decoder, Path(tmp) / f"out{r}-{i}")
                result["images_per_minute"] = args.images / result["wall_s"] * 60
                rows[name].append(result)
                print(f"{name}: {result['images_per_minute']:.1f} images/min, "
                      f"{result['wall_s']:.1f} s, workers' peak RSS "
                      f"{[round(x, 2) for x in result['worker_peak_rss_gib']]} GiB", flush=True)
    medians = {name: statistics.median(r["images_per_minute"] for r in runs)
               for name, runs in rows.items()}
    result = {"model": args.model, "images": args.images, "rounds": args.rounds,
              "cores": os.cpu_count(), "runs": rows, "median_images_per_minute": medians}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.out:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(args.out, lambda tmp: tmp.write_text(text), "pass another --out")


if __name__ == "__main__":
    main()
