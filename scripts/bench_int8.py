"""How each way of storing int8 weights serves an exported fp32 encoder, on this machine.

Dynamic int8 of the matrix products, by the exporter's own ``quantize_int8``, three ways: 8-bit
weights with one scale a weight, 7-bit (``reduce_range``: what AVX2 CPUs without VNNI need,
where ONNX Runtime's uint8 x int8 products saturate in 16 bits) and 7-bit with a scale per
output column (``per_channel``: the encoders' form since session 17). For each: every output's
error against the fp32 graph on one image (its largest and its RMS, relative to the fp32
output's), and the time of a run, the variants alternating round by round.

    python scripts/bench_int8.py exported/vit_t_encoder.onnx \
        --image ../shared/data/images/groceries.jpg
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from sam_onnx import families
from sam_onnx.exporter.run import quantize_int8
from sam_onnx.graph import metadata
from sam_onnx.runtime import transforms
from sam_onnx.runtime.images import load_image
from sam_onnx.runtime.sessions import SessionConfig, create

#: name -> (reduce_range, per_channel)
VARIANTS = {"8-bit": (False, False), "7-bit": (True, False), "7-bit per column": (True, True)}


def encoder_input(encoder: Path, image: Path) -> np.ndarray:
    """The pre-processed image, as SamOnnxPredictor.set_image feeds an exported encoder."""
    family = families.of_graph(metadata.read(onnx.load(str(encoder), load_external_data=False)))
    x, _ = transforms.image_to_input(load_image(image), family.preprocess)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("encoders", type=Path, nargs="+")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    for encoder in args.encoders:
        fp32 = create(encoder, SessionConfig(providers=("cpu",)))
        feed = {fp32.input_names[0]: encoder_input(encoder, args.image)}
        names, ref = fp32.output_names, fp32.run(None, feed)
        del fp32
        sessions, row = {}, {}
        for name, (reduce_range, per_channel) in VARIANTS.items():
            with tempfile.TemporaryDirectory(prefix="bench_int8_") as work:
                path = Path(work) / "encoder.onnx"
                quantize_int8(encoder, path, per_channel=per_channel, reduce_range=reduce_range)
                sessions[name] = create(path, SessionConfig(providers=("cpu",)))
            got = sessions[name].run(None, feed)
            row[name] = {"error": {n: {
                "max": float(np.abs(g - r).max() / np.abs(r).max()),
                "rms": float(np.sqrt(np.mean((g - r) ** 2) / np.mean(r ** 2)))}
                for n, g, r in zip(names, got, ref)}, "times": []}
        for i in range(args.rounds):
            for name in (list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]):
                start = time.perf_counter()
                sessions[name].run(None, feed)
                row[name]["times"].append(time.perf_counter() - start)
        for name, r in row.items():
            r["median_s"] = statistics.median(r["times"])
            errors = ", ".join(f"{n} max {e['max']:.1%} rms {e['rms']:.1%}"
                               for n, e in r["error"].items())
            print(f"{encoder.name} {name}: {errors}; {r['median_s']:.2f} s", flush=True)
        results[str(encoder)] = row
    if args.out:
        args.out.write_text(json.dumps({"image": str(args.image), "results": results}, indent=1))


if __name__ == "__main__":
    main()
