"""Benchmark start-up to ready: a fresh interpreter, ``import sam_onnx``'s runtime, then a
SamOnnxPredictor with both sessions built; wall time from outside, and inside it the import
and the predictor's construction. Each Python given runs in turn, alternating, ``--rounds``
times: ``PYTHON`` (e.g. one virtual environment per dependency set), or ``PYTHON@SRC`` to
import sam_onnx from the source folder SRC (e.g. a worktree of an earlier commit).

    python scripts/bench_startup.py --model vit_b --python python /tmp/venv/bin/python@/tmp/old \
        --out docs/bench_startup.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import time, json, sys
t0 = time.perf_counter()
if len(sys.argv) > 3:  # sam_onnx from this folder, ahead of any installed (editable) one
    import importlib.util
    init = sys.argv[3] + "/sam_onnx/__init__.py"
    spec = importlib.util.spec_from_file_location(
        "sam_onnx", init, submodule_search_locations=[sys.argv[3] + "/sam_onnx"])
    sys.modules["sam_onnx"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["sam_onnx"])
from sam_onnx.runtime.predictor import SamOnnxPredictor
from sam_onnx.runtime.sessions import SessionConfig
t1 = time.perf_counter()
SamOnnxPredictor(sys.argv[1], sys.argv[2], SessionConfig(providers=("cpu",)))
t2 = time.perf_counter()
import ml_dtypes, onnx, onnxruntime, sam_onnx
print(json.dumps({"import_s": t1 - t0, "predictor_s": t2 - t1, "ml_dtypes": ml_dtypes.__version__,
                  "sam_onnx": sam_onnx.__file__,
                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--python", nargs="+", default=[sys.executable])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sam-onnx-bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.work / f"runtime-{args.model}"
    encoder, decoder = out / f"{args.model}_encoder.onnx", \
        out / f"{args.model}_decoder_official.onnx"
    if not (encoder.exists() and decoder.exists()):
        raise SystemExit(f"export {args.model} to {out} first (scripts/bench_runtime.py does)")
    runs = {python: [] for python in args.python}
    for _ in range(args.rounds):
        for python in args.python:
            executable, _, src = python.partition("@")
            start = time.perf_counter()
            proc = subprocess.run([executable, "-c", CHILD, str(encoder), str(decoder),
                                   *([src] if src else [])],
                                  capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            runs[python].append({"wall_s": wall, **json.loads(proc.stdout.splitlines()[-1])})
    med = statistics.median
    print(f"{args.model}, start-up to ready, medians of {args.rounds} fresh processes each")
    print("| python | ml_dtypes | wall | import | predictor (sessions) |")
    print("| --- | --- | --- | --- | --- |")
    for python, rows in runs.items():
        print(f"| {python} | {rows[0]['ml_dtypes']} | {med(r['wall_s'] for r in rows):.3f} s | "
              f"{med(r['import_s'] for r in rows):.3f} s | "
              f"{med(r['predictor_s'] for r in rows):.3f} s |")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
