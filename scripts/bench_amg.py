"""Benchmark automatic mask generation: the family's own generator in PyTorch and
SamOnnxAutomaticMaskGenerator on ONNX Runtime, side by side in one run, same image and weights.

Every run is a fresh process (so its peak RSS is its own), the pipelines alternate within each
repeat, and every ONNX run's records are compared with PyTorch's (same count, matched masks
IoU >= 0.98, boxes within a pixel). Reported: end to end, after the encoder, masks, peak RSS.

    python scripts/bench_amg.py --model vit_b --image ../shared/data/images/groceries.jpg \
        --image synthetic512 --keeping --split --out docs/bench_amg.json
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

import numpy as np

#: The ONNX pipelines: fp32; the int8 encoder with the fp32 decoder; both int8.
VARIANTS = ("onnx fp32", "onnx int8 encoder", "onnx int8")
KEEPING = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


def synthetic(size: int = 512) -> np.ndarray:
    """A deterministic test card: gradients, a checkerboard and three solid shapes."""
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, ((x // 32 + y // 32) % 2) * 200], -1)
    img[100:220, 80:260] = [230, 40, 40]
    img[300:460, 300:420] = [40, 200, 60]
    img[((x - 380) ** 2 + (y - 140) ** 2) < 60 ** 2] = [250, 250, 30]
    return img.astype(np.uint8)


def load(image: str) -> np.ndarray:
    from sam_onnx.runtime.images import load_image

    return synthetic() if image == "synthetic512" else load_image(image)


def child(args) -> None:
    """One pipeline, one image, one run: prints a JSON line."""
    if args.pipeline == "threshold":
        print(json.dumps({"pred_iou_thresh": half_the_prompts(args.image, args.encoder,
                                                              args.decoder)}))
        return
    from sam_onnx.core.stages import peak_rss_gib

    start = time.perf_counter()
    settings = json.loads(args.settings)
    if args.pipeline == "torch":
        from sam_onnx.exporter.checkpoints import build, load_state_dict
        from sam_onnx.families import family_of

        sam = build(args.model, load_state_dict(Path(args.checkpoint)))
        side = family_of(args.model).torch()  # the family's own generator (mobile_sam's...)
        gen = side.SamAutomaticMaskGenerator(sam, output_mode="uncompressed_rle", **settings)
    else:
        from sam_onnx.runtime.automatic import SamOnnxAutomaticMaskGenerator
        from sam_onnx.runtime.predictor import SamOnnxPredictor
        from sam_onnx.runtime.sessions import SessionConfig

        predictor = SamOnnxPredictor(args.encoder, args.decoder, SessionConfig(providers=("cpu",)))
        gen = SamOnnxAutomaticMaskGenerator(predictor, output_mode="uncompressed_rle", **settings)
    init = time.perf_counter() - start
    image = load(args.image)
    encoder_time = []
    set_image = gen.predictor.set_image

    def timed_set_image(*a, **k):
        t = time.perf_counter()
        set_image(*a, **k)
        encoder_time.append(time.perf_counter() - t)

    gen.predictor.set_image = timed_set_image
    start = time.perf_counter()
    records = gen.generate(image)
    total = time.perf_counter() - start
    Path(args.records).write_text(json.dumps([
        {**r, "segmentation": r["segmentation"]} for r in records]))
    print(json.dumps({"init_s": init, "total_s": total, "encoder_s": sum(encoder_time),
                      "after_encoder_s": total - sum(encoder_time), "masks": len(records),
                      "peak_rss_gib": peak_rss_gib()}))


def run_child(pipeline: str, image: str, settings: dict, args, records: Path, **paths) -> dict:
    cmd = [sys.executable, __file__, "--child", pipeline, "--model", args.model,
           "--image", image, "--settings", json.dumps(settings), "--records", str(records)]
    for key, value in paths.items():
        cmd += [f"--{key}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{pipeline} on {image} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def half_the_prompts(image: str, encoder: Path, decoder: Path) -> float:
    """A pred_iou_thresh that half the grid's prompts pass (their best multimask score is
    above it), so the decoder upscales half of them: random weights pass none at 0.88.
    In a child of its own, so the parent stays small."""
    from sam_onnx.runtime.amg import build_point_grid
    from sam_onnx.runtime.predictor import SamOnnxPredictor
    from sam_onnx.runtime.sessions import SessionConfig

    predictor = SamOnnxPredictor(encoder, decoder, SessionConfig(providers=("cpu",)))
    img = load(image)
    predictor.set_image(img)
    points = build_point_grid(32) * np.array(img.shape[1::-1])
    _, scores = predictor.predict_batch(points[:, None], np.ones((len(points), 1)))
    return float(np.median(scores.max(axis=1)))


def parity(reference: Path, records: Path):
    from sam_onnx.core.parity import compare_records
    from sam_onnx.runtime import amg

    def masks(path):
        recs = json.loads(path.read_text())
        for r in recs:
            r["segmentation"] = amg.rle_to_mask(r["segmentation"])
        return recs

    return compare_records(masks(reference), masks(records))


def _current(decoder: Path, model: str) -> bool:
    """Whether a decoder exported by an earlier run still follows the batched contract."""
    import onnx

    from sam_onnx.families import family_of, get_contract
    from sam_onnx.graph.signature import mismatches

    contract = get_contract(family_of(model).decoder_contract("batched"))
    return decoder.exists() and not mismatches(onnx.load(str(decoder), load_external_data=False),
                                               contract)


def _plans(args, tmp: Path, encoder: Path, decoder: Path):
    """(image, setting name, generator settings, PyTorch runs, ONNX runs) to measure."""
    plans = [(image, "defaults", {}, args.torch_repeat, args.repeat) for image in args.image]
    if args.keeping:
        plans.append((args.image[-1], "masks kept", KEEPING, 1, 1))
    if args.split:
        thresh = run_child("threshold", args.image[-1], {}, args, tmp / "unused",
                           encoder=encoder, decoder=decoder)["pred_iou_thresh"]
        plans.append((args.image[-1], "half the prompts' masks",
                      {**KEEPING, "pred_iou_thresh": thresh}, 1, 1))
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--records")
    parser.add_argument("--checkpoint")
    parser.add_argument("--encoder")
    parser.add_argument("--decoder")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torch-repeat", type=int, default=2)
    parser.add_argument("--variant", action="append", choices=VARIANTS,
                        help="the ONNX pipelines to run (repeatable; default: all three); "
                        "fp32 alone skips the int8 export, minutes for the larger models")
    parser.add_argument("--keeping", action="store_true",
                        help="Also one run with thresholds that keep masks (random weights).")
    parser.add_argument("--split", action="store_true",
                        help="Also one run whose pred_iou_thresh half the prompts pass.")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sam-onnx-bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        args.pipeline, args.image = args.child, args.image[0]
        return child(args)

    import sam_onnx
    from sam_onnx.families import family_of

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_export import random_checkpoint

    ckpt = random_checkpoint(args.model, args.work)
    out = args.work / f"amg-{args.model}"
    name = f"{args.model}_decoder_{family_of(args.model).decoder_contract('batched')}"
    chosen = args.variant or VARIANTS
    int8 = any("int8" in label for label in chosen)
    if not _current(out / f"{name}{'.int8' if int8 else ''}.onnx", args.model):
        sam_onnx.export(args.model, checkpoint=ckpt, out_dir=out, decoder_contract="batched",
                        quantize="int8" if int8 else None)
    enc = out / f"{args.model}_encoder.onnx"
    enc8 = out / f"{args.model}_encoder.int8.onnx"
    paths = {"onnx fp32": (enc, out / f"{name}.onnx"),
             "onnx int8 encoder": (enc8, out / f"{name}.onnx"),
             "onnx int8": (enc8, out / f"{name}.int8.onnx")}
    variants = {label: paths[label] for label in VARIANTS if label in chosen}
    results = {"model": args.model,
               "weights": "random (the family's own builders, saved checkpoint)",
               "runs": []}
    tmp = Path(tempfile.mkdtemp())
    for image, setting_name, settings, torch_repeat, repeat in _plans(args, tmp, enc,
                                                                      out / f"{name}.onnx"):
        rows = {k: [] for k in ["torch", *variants]}
        gates = {}
        for i in range(max(torch_repeat, repeat)):
            ref = tmp / "torch.json"
            if i < torch_repeat or not ref.exists():
                rows["torch"].append(run_child("torch", image, settings, args, ref,
                                               checkpoint=ckpt))
                print("torch", image, rows["torch"][-1], flush=True)
            for label, (e, d) in variants.items():
                if i >= repeat:
                    continue
                recs = tmp / f"{label}.json"
                rows[label].append(run_child("onnx", image, settings, args, recs, encoder=e,
                                             decoder=d))
                gates[label] = parity(ref, recs).to_dict()
                print(label, image, rows[label][-1], gates[label], flush=True)
        summary = {}
        for label, runs in rows.items():
            summary[label] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            summary[label]["runs"] = len(runs)
            summary[label]["total_s_all"] = [round(r["total_s"], 2) for r in runs]
        for label in variants:
            summary[label]["speedup_end_to_end"] = (summary["torch"]["total_s"]
                                                    / summary[label]["total_s"])
            summary[label]["speedup_after_encoder"] = (summary["torch"]["after_encoder_s"]
                                                       / summary[label]["after_encoder_s"])
            summary[label]["records_parity"] = gates[label]
        results["runs"].append({"image": Path(image).name, "settings": setting_name,
                                "values": settings, "pipelines": summary})
        print(json.dumps(results["runs"][-1], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    """The docs/benchmarks.md table: one row per image, settings and pipeline."""
    lines = ["| image | settings | pipeline | end to end (s) | after the encoder (s) | masks | "
             "peak RSS (GiB) | speed-up end to end | records = PyTorch's |",
             "|" + "---|" * 9]
    for run in results["runs"]:
        settings = run["settings"]
        for label, p in run["pipelines"].items():
            gate = p.get("records_parity")
            same = "" if gate is None else ("yes" if gate["passed"] else
                                            f"**no** (min IoU {gate['min_iou']:.3f})")
            speed = f"{p['speedup_end_to_end']:.2f}x" if "speedup_end_to_end" in p else ""
            spread = "" if p["runs"] < 2 else \
                f" ({min(p['total_s_all']):.1f}-{max(p['total_s_all']):.1f})"
            lines.append(f"| {run['image']} | {settings} | {label} | {p['total_s']:.1f}{spread} "
                         f"| {p['after_encoder_s']:.1f} | {p['masks']:.0f} | "
                         f"{p['peak_rss_gib']:.2f} | {speed} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
