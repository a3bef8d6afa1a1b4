"""Benchmark the runtime against PyTorch, side by side in one run on one image and weights.

Encoder latency: ONNX Runtime vs torch eager vs this machine's fp32 GEMM floor (encoder FLOPs,
counted by torch's FlopCounterMode, over the fp32 matmul rate measured in the same run).
One prompt: SamOnnxPredictor.predict (on the ``--decoder-contract`` graph) vs the family's own
SamPredictor.predict, upscaling to the image included, in ``--rounds`` rounds that alternate
the two (which goes first alternates too), the ratio taken within each round: this machine's
speed drifts within minutes (sam2's one prompt 137 ms in one run and 70 ms in the next, measured),
so blocks run one after the other compare two different machines. set_image: each
predictor's, what it keeps for the prompts included (SAM 2's batched decoder: the maps in
block order).

    python scripts/bench_runtime.py --model vit_b --image ../shared/data/images/truck.jpg
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from sam_onnx.tools.bench import timed


def median_time(fn, repeat: int, warmup: int = 1) -> list:
    """The run times, for the JSON: sam-onnx bench's timer."""
    return timed(fn, repeat, warmup)["times"]


def gemm_rate(n: int = 2048, repeat: int = 10) -> float:
    """fp32 FLOP/s of torch.mm on this machine (its BLAS, all threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = median_time(lambda: torch.mm(a, b), repeat, warmup=3)
    return 2 * n**3 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prompt-repeat", type=int, default=20, help="prompts a round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decoder-contract", default="official",
                        help="the decoder one prompt runs: a form (official, batched) or a "
                        "contract name")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sam-onnx-bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    import sam_onnx
    from sam_onnx.exporter.checkpoints import build, load_state_dict
    from sam_onnx.runtime import transforms
    from sam_onnx.runtime.images import load_image
    from sam_onnx.runtime.predictor import SamOnnxPredictor
    from sam_onnx.runtime.sessions import SessionConfig, create

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_export import random_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = random_checkpoint(args.model, args.work)
    out = args.work / f"runtime-{args.model}"
    family = sam_onnx.families.family_of(args.model)
    contract = family.decoder_contract(args.decoder_contract)
    decoder_path = out / f"{args.model}_decoder_{contract}.onnx"
    if not (out / f"{args.model}_encoder.onnx").exists() or not decoder_path.exists():
        sam_onnx.export(args.model, checkpoint=ckpt, out_dir=out, decoder_contract=contract)
    sam = build(args.model, load_state_dict(ckpt))
    image = load_image(args.image)
    x, _ = transforms.image_to_input(image, family.preprocess)

    rate = gemm_rate()
    encoder = family.torch().encoder_module(sam)  # what the encoder graph computes
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder(torch.from_numpy(x))
    flops = counter.get_total_flops()
    floor = flops / rate

    encoder_path = out / f"{args.model}_encoder.onnx"
    cache = args.work / "ort-cache"
    init_plain = median_time(lambda: create(encoder_path, SessionConfig(providers=("cpu",))),
                             args.repeat)
    init_cached = median_time(lambda: create(encoder_path, SessionConfig(
        providers=("cpu",), cache_dir=cache)), args.repeat)  # the warm-up run fills the cache

    onnx_pred = SamOnnxPredictor(out / f"{args.model}_encoder.onnx", decoder_path,
                                 SessionConfig(providers=("cpu",)))
    torch_pred = family.torch().SamPredictor(sam)  # the family's own (mobile_sam's for vit_t)
    enc_onnx = median_time(lambda: onnx_pred.encoder.run(None, {"image": x}), args.repeat)
    with torch.inference_mode():
        enc_torch = median_time(lambda: encoder(torch.from_numpy(x)), args.repeat)

    set_onnx = median_time(lambda: onnx_pred.set_image(image), args.repeat)
    set_torch = median_time(lambda: torch_pred.set_image(image), args.repeat)
    h, w = image.shape[:2]
    point, label = np.array([[w // 2, h // 2]]), np.array([1])
    sides = [lambda: onnx_pred.predict(point, label), lambda: torch_pred.predict(point, label)]
    rounds = []  # (ONNX, PyTorch) round medians
    for i in range(args.rounds):
        order = sides if i % 2 == 0 else sides[::-1]
        medians = [statistics.median(median_time(fn, args.prompt_repeat, warmup=3))
                   for fn in order]
        rounds.append(tuple(medians if i % 2 == 0 else medians[::-1]))
    p_onnx, p_torch = [r[0] for r in rounds], [r[1] for r in rounds]
    ratios = [t / o for o, t in rounds]

    med = statistics.median
    result = {
        "model": args.model, "decoder_contract": contract, "image": str(args.image),
        "image_size": [h, w],
        "threads": torch.get_num_threads(), "gemm_flops_per_s": rate, "encoder_flops": flops,
        "encoder_floor_s": floor,
        "encoder_onnx_s": enc_onnx, "encoder_torch_s": enc_torch,
        "prompt_onnx_s": p_onnx, "prompt_torch_s": p_torch, "prompt_ratios": ratios,
        "set_image_onnx_s": set_onnx, "set_image_torch_s": set_torch,
        "encoder_session_s": init_plain, "encoder_session_cached_s": init_cached,
    }
    rows = [
        ("encoder (s)", med(enc_torch), med(enc_onnx), floor),
        ("set_image (s)", med(set_torch), med(set_onnx), None),
        ("one prompt incl. upscaling (ms)", med(p_torch) * 1e3, med(p_onnx) * 1e3, None),
    ]
    print(f"{args.model} ({contract}) on {args.image.name} ({w}x{h}), "
          f"{torch.get_num_threads()} threads; "
          f"fp32 GEMM {rate / 1e9:.0f} GFLOP/s; encoder {flops / 1e12:.3f} TFLOP")
    print("| metric | PyTorch | ONNX Runtime | PyTorch/ONNX | GEMM floor | ONNX/floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, t, o, f in rows:
        print(f"| {name} | {t:.3f} | {o:.3f} | {t / o:.2f}x | " +
              (f"{f:.3f} | {o / f:.2f}x |" if f else "| |"))
    print(f"one prompt, PyTorch / ONNX within each of {args.rounds} rounds: median "
          f"{med(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)")
    print(f"encoder session start: {med(init_plain):.3f} s; from the optimized-model cache: "
          f"{med(init_cached):.3f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
