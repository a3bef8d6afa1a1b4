"""Regenerate the model x image-size section of docs/benchmarks.md with `sam-onnx bench`'s
machinery: PyTorch (each family's own predictor) and ONNX Runtime side by side for vit_b,
vit_l, vit_h, MobileSAM's vit_t and HQ-SAM's hq_vit_b at 512x512, 1024x1024 and 1800x1200, to
show how cost grows with model and image size.

    python scripts/bench_report.py --graphs /tmp/sam-onnx-bench/out --repeat 3

Graphs are `<model>_encoder.onnx` and the family's official decoder under --graphs,
exported from the random checkpoints `random_<model>.pth` under --work (scripts/bench_export.py
writes both). Automatic mask generation is timed separately (scripts/bench_amg.py): at 122 s
a PyTorch run for vit_b it would dominate this grid.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from sam_onnx.families import family_of
from sam_onnx.tools.bench import BenchConfig, bench

MODELS = ("vit_b", "vit_l", "vit_h", "vit_t", "hq_vit_b", "sam2.1_hiera_tiny")
SIZES = ((512, 512), (1024, 1024), (1200, 1800))
START, END = "<!-- bench_report:start -->", "<!-- bench_report:end -->"


def _m(metrics, key):
    value = metrics.get(key)
    return value["median"] if isinstance(value, dict) else value


def table(results) -> str:
    head = ("| model | image | start-up PyTorch / ONNX (s) | encoder PyTorch / ONNX (s) | "
            "ratio | ONNX % of GEMM floor | one prompt PyTorch / ONNX (ms) | ratio | "
            "peak RSS PyTorch / ONNX (GiB) |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        t, o = r["pipelines"]["PyTorch"], r["pipelines"]["ONNX cpu"]
        lines.append(
            f"| {r['config']['model_type']} | {r['config']['image_name']} | "
            f"{_m(t, 'init_s'):.2f} / {_m(o, 'init_s'):.2f} | "
            f"{_m(t, 'encoder_s'):.2f} / {_m(o, 'encoder_s'):.2f} | "
            f"{_m(o, 'encoder_s') / _m(t, 'encoder_s'):.2f} | {o['encoder_floor_pct']:.0f}% | "
            f"{_m(t, 'prompt_ms'):.1f} / {_m(o, 'prompt_ms'):.1f} | "
            f"{_m(o, 'prompt_ms') / _m(t, 'prompt_ms'):.2f} | "
            f"{t['peak_rss_gib']:.2f} / {o['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sam-onnx-bench")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("docs/bench_report.json"))
    parser.add_argument("--update", action="store_true",
                        help="re-measure --models only; keep the other models' rows from --json")
    args = parser.parse_args()
    models = args.models.split(",")
    kept = [r for r in json.loads(args.json.read_text())
            if r["config"]["model_type"] not in models] if args.update else []
    results = []
    for model in models:
        for size in SIZES:
            cfg = BenchConfig(model, args.work / f"random_{model}.pth", False,
                              args.graphs / f"{model}_encoder.onnx",
                              args.graphs / f"{model}_decoder_"
                              f"{family_of(model).decoder_contract('official')}.onnx",
                              image_size=size, repeat=args.repeat, automatic=False)
            report = bench(cfg, ("cpu",), log=lambda m: print(m, file=sys.stderr, flush=True))
            results.append(report.to_dict())
            print(f"{model} {size}:\n{report.markdown()}\n", flush=True)
            args.json.write_text(json.dumps(kept + results, indent=2) + "\n")
    results = sorted(kept + results, key=lambda r: MODELS.index(r["config"]["model_type"]))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    env = results[-1]["environment"]
    section = "\n".join([
        START,
        f"Random weights loaded from .pth, {env['cpu']}, {env['cores']} cores, ONNX Runtime "
        f"{env['versions'].get('onnxruntime')} on CPUExecutionProvider (no GPU was lent to this "
        f"task: no CUDA or fp16 rows). Medians of {args.repeat} runs after a warm-up, each "
        "pipeline in a fresh process; ratio = ONNX / PyTorch. The encoder always sees a "
        "1024x1024 input, so image size moves only pre-processing and the prompt's upscaling. "
        "ONNX % of GEMM floor: the encoder's FLOPs over the fp32 MatMul rate ONNX Runtime "
        "itself reached between the encoder's runs (sam-onnx bench since 2026-12-03; rows "
        f"measured before used torch.mm's rate; torch.mm reached {env['gemm_gflops']:.0f} "
        "GFLOP/s in the last row's run). "
        "Regenerate with `python scripts/bench_report.py --graphs DIR`; every number is in "
        f"`{args.json}`.",
        "",
        table(results),
        END])
    text = args.docs.read_text()
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text,
                      flags=re.S)
    else:
        text += ("\n## PyTorch vs ONNX by model and image size (`sam-onnx bench`)\n\n"
                 + section + "\n")
    args.docs.write_text(text)


if __name__ == "__main__":
    main()
