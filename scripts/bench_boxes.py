"""Benchmark a detector's boxes turned into masks: B boxes in one ``predict_batch(boxes=)``
call on the batched decoder vs B ``predict(box=)`` calls on the official decoder, each
ending in B full-size masks (one a box, ``multimask_output=False``, as detector pipelines
ask SamPredictor.predict_torch for them). A third row, one call on the official decoder
(one prompt a decoder run), tells the batched graph's share from the Python calls'.

Same process, same image embedding, the two ways alternating round by round; medians of
the rounds. The graphs are exported once (random weights: speed only) into --graphs.

    python scripts/bench_boxes.py --model vit_b --boxes 32 --rounds 7 \
        --out docs/bench_boxes.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "images"


def graphs(model: str, folder: Path) -> dict:
    """The encoder and both decoders, exported into ``folder`` unless already there."""
    import sam_onnx

    paths = {"encoder": folder / f"{model}_encoder.onnx",
             "official": folder / f"{model}_decoder_official.onnx",
             "batched": folder / f"{model}_decoder_batched.onnx"}
    if not paths["encoder"].exists():
        sam_onnx.export(model, random_weights=True, out_dir=folder)
    if not paths["batched"].exists():
        sam_onnx.export(model, random_weights=True, out_dir=folder, encoder=False,
                        decoder_contract="batched")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--boxes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--graphs", type=Path, default=Path("/tmp/sam-onnx-bench/boxes"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from sam_onnx.core.files import atomic_write
    from sam_onnx.runtime.images import load_image, synthetic
    from sam_onnx.runtime.predictor import SamOnnxPredictor
    from sam_onnx.runtime.sessions import SessionConfig

    paths = graphs(args.model, args.graphs)
    truck = IMAGES / "truck.jpg"
    image = load_image(truck) if truck.exists() else synthetic(1200, 1800)
    h, w = image.shape[:2]
    config = SessionConfig(providers=("cpu",))
    calls = SamOnnxPredictor(paths["encoder"], paths["official"], config)
    calls.set_image(image)
    batch = SamOnnxPredictor(None, paths["batched"], config)
    embedding = args.graphs / "embedding.npz"
    calls.save_embedding(embedding)
    batch.load_embedding(embedding)

    rng = np.random.default_rng(0)
    corner = rng.uniform(0, [w * 0.7, h * 0.7], (args.boxes, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(40, [w * 0.3, h * 0.3],
                                                         (args.boxes, 2))], axis=1)

    def one_call():
        low_res, scores = batch.predict_batch(boxes=boxes, multimask_output=False)
        return batch.postprocess_masks(low_res[:, 0]), scores

    def one_call_official():  # one Python call, one prompt a decoder run
        low_res, scores = calls.predict_batch(boxes=boxes, multimask_output=False)
        return calls.postprocess_masks(low_res[:, 0]), scores

    def many_calls():
        out = [calls.predict(box=b, multimask_output=False) for b in boxes]
        return np.stack([m[0] for m, _, _ in out]), np.stack([s for _, s, _ in out])

    masks_one, scores_one = one_call()  # warm both, and check they agree
    masks_many, scores_many = many_calls()
    agree = float(np.mean(masks_one == masks_many))
    runs = {"one_call": one_call, "one_call_official": one_call_official, "calls": many_calls}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "boxes": args.boxes, "rounds": args.rounds,
        "image": f"{truck.name if truck.exists() else 'synthetic'} {w}x{h}",
        "seconds": times, "median_s": medians,
        "speedup": medians["calls"] / medians["one_call"],
        "max_score_difference": float(np.abs(scores_one - scores_many).max()),
        "mask_pixels_equal": agree,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))
    if args.out:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(args.out, lambda tmp: tmp.write_text(text), "pass another --out")


if __name__ == "__main__":
    main()
