"""Benchmark the encoder image after image: its working memory kept between images (the
default) vs handed back after each (``SamOnnxPredictor(release_memory=True)``).

Each mode runs in a fresh process, the modes alternating, on the same graphs and images:
set_image on N images in turn; per image the wall time, the page faults and the system time
it cost; then the RSS held between images and the peak RSS, including one prompt after the
last image (what an interactive user does).

    python scripts/bench_encoder_memory.py --model vit_b --images 6 --rounds 3 \
        --out docs/bench_encoder_memory.json
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "images"


def _rss_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def child(encoder: str, decoder: str, release: bool, n: int) -> dict:
    """One mode in this (fresh) process: set_image on n images, then one prompt."""
    import numpy as np

    from sam_onnx.runtime.images import load_image, synthetic
    from sam_onnx.runtime.predictor import SamOnnxPredictor
    from sam_onnx.runtime.sessions import SessionConfig

    files = sorted(IMAGES.glob("*.jpg"))
    images = [load_image(f) for f in files][:n]
    images += [synthetic(700 + 37 * i, 1000 - 29 * i) for i in range(n - len(images))]
    pred = SamOnnxPredictor(encoder, decoder, SessionConfig(providers=("cpu",)),
                            release_memory=release)
    rows = []
    for image in images:
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        pred.set_image(image)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"wall_s": wall, "minor_faults": after.ru_minflt - before.ru_minflt,
                     "system_s": after.ru_stime - before.ru_stime,
                     "rss_after_gib": _rss_gib("VmRSS")})
    h, w = images[-1].shape[:2]
    pred.predict(np.array([[w // 2, h // 2]]), np.array([1]))
    return {"release_memory": release, "images": rows, "peak_rss_gib": _rss_gib("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sam-onnx-bench")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        encoder, decoder, release, n = args.child
        print(json.dumps(child(encoder, decoder, release == "1", int(n))))
        return

    import sam_onnx

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_export import random_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / f"runtime-{args.model}"
    encoder, decoder = out / f"{args.model}_encoder.onnx", \
        out / f"{args.model}_decoder_official.onnx"
    if not (encoder.exists() and decoder.exists()):
        sam_onnx.export(args.model, checkpoint=random_checkpoint(args.model, args.work),
                        out_dir=out)
    runs = []
    for _ in range(args.rounds):
        for release in (False, True):  # alternating, each in a fresh process
            proc = subprocess.run([sys.executable, __file__, "--child", str(encoder),
                                   str(decoder), str(int(release)), str(args.images)],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.splitlines()[-1]))
    med = statistics.median
    summary = {}
    for release in (False, True):
        mine = [r for r in runs if r["release_memory"] == release]
        later = [i for r in mine for i in r["images"][1:]]  # the first image pays either way
        summary["released" if release else "kept"] = {
            "image_s": med(i["wall_s"] for i in later),
            "minor_faults": med(i["minor_faults"] for i in later),
            "system_s": med(i["system_s"] for i in later),
            "rss_between_images_gib": med(i["rss_after_gib"] for i in later),
            "peak_rss_gib": med(r["peak_rss_gib"] for r in mine),
        }
    kept, released = summary["kept"], summary["released"]
    print(f"{args.model}: {args.images} images a process, {args.rounds} rounds, medians of the "
          "images after the first")
    print("| memory between images | encoder, an image | minor page faults | system time | "
          "RSS between images | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in summary.items():
        print(f"| {name} | {row['image_s']:.2f} s | {row['minor_faults']:,.0f} | "
              f"{row['system_s']:.2f} s | {row['rss_between_images_gib']:.2f} GiB | "
              f"{row['peak_rss_gib']:.2f} GiB |")
    print(f"kept vs released: {released['image_s'] / kept['image_s']:.2f}x faster an image")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "images": args.images,
                                        "summary": summary, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
