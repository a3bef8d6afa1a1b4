"""SamOnnxAutomaticMaskGenerator and `sam-onnx segment` against segment_anything's generator
on the same random weights, and the numpy post-processing against segment_anything's own."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils import amg as sa_amg
from torchvision.ops import nms as tv_nms

from sam_onnx.core.errors import SamOnnxError
from sam_onnx.core.parity import compare_records
from sam_onnx.exporter.checkpoints import build, load_state_dict
from sam_onnx.runtime import amg
from sam_onnx.runtime.automatic import SamOnnxAutomaticMaskGenerator
from sam_onnx.runtime.images import synthetic
from sam_onnx.runtime.predictor import SamOnnxPredictor

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
#: Thresholds that keep masks from random weights: their masks cover most of the image, so
#: any NMS keeps one (at the defaults almost nothing survives at all).
KEEPING = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def models(tiny_export, tiny_checkpoint, tiny_batched):
    out, _ = tiny_export
    sam = build("tiny", load_state_dict(tiny_checkpoint))
    return {"encoder": out / "tiny_encoder.onnx", "batched": tiny_batched,
            "official": out / "tiny_decoder_official.onnx", "sam": sam}


@pytest.fixture(scope="module")
def predictor(models):
    return SamOnnxPredictor(models["encoder"], models["batched"])


def _synthetic(h=256, w=384):
    return synthetic(h, w)


def _images():
    out = [("synthetic 256x384", _synthetic())]
    for name in ("dog.jpg", "landsat-rmnp.tif"):
        if (IMAGES / name).exists():
            out.append((name, np.asarray(Image.open(IMAGES / name).convert("RGB"))))
    return out


# -- the numpy post-processing equals segment_anything's ------------------------------------
def _random_masks(k=6, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((k, h, w)).astype(np.float32) * 3
    logits[0] = -5  # an empty mask
    logits[1, 10:20, 5:30] = 8  # a solid block
    return logits


def test_stability_boxes_and_rles_equal_segment_anything():
    logits = _random_masks()
    np.testing.assert_allclose(
        amg.stability_score(logits, 0.0, 1.0),
        sa_amg.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy(), rtol=1e-6)
    masks = logits > 0
    np.testing.assert_array_equal(amg.batched_mask_to_box(masks),
                                  sa_amg.batched_mask_to_box(torch.from_numpy(masks)).numpy())
    rles = amg.mask_to_rle(masks)
    assert rles == sa_amg.mask_to_rle_pytorch(torch.from_numpy(masks))
    for rle, mask in zip(rles, masks):
        np.testing.assert_array_equal(amg.rle_to_mask(rle), mask)
        assert amg.area_from_rle(rle) == sa_amg.area_from_rle(rle) == mask.sum()


def test_coco_rle_equals_pycocotools_and_decodes_back():
    from pycocotools import mask as mask_utils

    for rle in amg.mask_to_rle(_random_masks(seed=3) > 0):
        encoded = amg.coco_encode_rle(rle)
        assert encoded == sa_amg.coco_encode_rle(rle)
        assert amg.coco_decode_rle(encoded) == rle
        np.testing.assert_array_equal(mask_utils.decode({**encoded, "counts":
                                                         encoded["counts"].encode()}),
                                      amg.rle_to_mask(rle))


def test_nms_crops_and_grids_equal_segment_anything():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (300, 2))], 1).astype(np.float32)
    scores = rng.random(300).astype(np.float32)
    for thresh in (0.3, 0.7):
        np.testing.assert_array_equal(
            amg.nms(boxes, scores, thresh),
            tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thresh).numpy())
    for size, layers in (((534, 800), 1), ((1200, 1800), 2), ((373, 485), 0)):
        assert amg.generate_crop_boxes(size, layers, 512 / 1500) == \
            sa_amg.generate_crop_boxes(size, layers, 512 / 1500)
    for got, want in zip(amg.build_all_layer_point_grids(16, 2, 2),
                         sa_amg.build_all_layer_point_grids(16, 2, 2)):
        np.testing.assert_array_equal(got, want)
    edge = np.array([[0, 0, 10, 10], [100, 100, 190, 150], [5, 50, 60, 60]])
    np.testing.assert_array_equal(
        amg.is_box_near_crop_edge(edge, [0, 0, 200, 200], [0, 0, 400, 300]),
        sa_amg.is_box_near_crop_edge(torch.from_numpy(edge), [0, 0, 200, 200],
                                     [0, 0, 400, 300]).numpy())


def test_small_regions_are_filled_and_dropped():
    mask = np.zeros((40, 40), bool)
    mask[5:30, 5:30] = True
    mask[10:12, 10:12] = False  # a 4-pixel hole
    mask[35:37, 35:37] = True  # a 4-pixel island
    filled, changed = amg.remove_small_regions(mask, 10, "holes")
    assert changed and filled[10:12, 10:12].all() and filled[35:37, 35:37].all()
    cleaned, changed = amg.remove_small_regions(filled, 10, "islands")
    assert changed and not cleaned[35:37, 35:37].any() and cleaned[5:30, 5:30].all()
    assert amg.remove_small_regions(cleaned, 10, "islands") == (cleaned, False) or \
        not amg.remove_small_regions(cleaned, 10, "islands")[1]


# -- the generator equals segment_anything's --------------------------------------------------
def test_raw_per_point_outputs_equal_sam_predictor(models, predictor):
    """Before any filtering: the batched decoder's logits and scores for a grid of points."""
    torch_pred = SamPredictor(models["sam"])
    for name, img in _images():
        predictor.set_image(img)
        torch_pred.set_image(img)
        h, w = img.shape[:2]
        points = amg.build_point_grid(6) * np.array([w, h])
        low_res, scores = predictor.predict_batch(points[:, None], np.ones((len(points), 1)))
        coords = torch_pred.transform.apply_coords(points, (h, w))
        _, t_scores, t_low_res = torch_pred.predict_torch(
            torch.from_numpy(coords)[:, None].float(), torch.ones(len(points), 1),
            multimask_output=True)
        np.testing.assert_allclose(low_res, t_low_res.numpy(), atol=1e-4, err_msg=name)
        np.testing.assert_allclose(scores, t_scores.numpy(), atol=1e-4, err_msg=name)


def _grid_args(img, per_side=6):
    points = amg.build_point_grid(per_side) * np.array([img.shape[1], img.shape[0]])
    return points[:, None], np.ones((len(points), 1))


def test_filtered_batch_holds_the_unfiltered_rows_of_prompts_above_the_threshold(models,
                                                                                 predictor):
    img = _synthetic()
    predictor.set_image(img)
    args = _grid_args(img)
    low_res, scores = predictor.predict_batch(*args)
    thresh = float(np.median(scores.max(axis=1)))
    got, got_scores, kept = predictor.predict_batch_filtered(*args, thresh)
    np.testing.assert_array_equal(kept, np.flatnonzero((scores > thresh).any(axis=1)))
    assert 0 < len(kept) < len(scores)
    np.testing.assert_array_equal(got_scores, scores)
    np.testing.assert_allclose(got, low_res[kept], atol=1e-5)
    none, _, kept = predictor.predict_batch_filtered(*args, np.inf)
    assert none.shape == (0, 3, 256, 256) and kept.shape == (0,)
    # a decoder that runs one prompt per call gives the same prompts
    one_by_one = SamOnnxPredictor(models["encoder"], models["official"])
    one_by_one.set_image(img)
    same, _, kept_one = one_by_one.predict_batch_filtered(*args, thresh)
    np.testing.assert_array_equal(kept_one, np.flatnonzero((scores > thresh).any(axis=1)))
    np.testing.assert_allclose(same, got, atol=1e-4)


def test_batched_graph_upscales_only_prompts_with_a_score_above_the_threshold(predictor):
    """The graph itself: any of the four scores (the single-mask one too) keeps a prompt."""
    img = _synthetic()
    predictor.set_image(img)
    coords, labels = _grid_args(img)
    feed = predictor._feed(np.concatenate([coords, np.zeros_like(coords)], 1),
                           np.concatenate([labels, -np.ones_like(labels)], 1), None)
    outputs = ("low_res_masks", "iou_predictions", "kept_prompts")
    masks, iou, kept = map(predictor._run(feed).get, outputs)
    np.testing.assert_array_equal(kept, np.arange(len(iou)))
    thresh = float(np.median(iou.max(axis=1)))
    feed["pred_iou_thresh"] = np.array([thresh], np.float32)
    some_masks, same_iou, some = map(predictor._run(feed).get, outputs)
    np.testing.assert_array_equal(some, np.flatnonzero((iou > thresh).any(axis=1)))
    assert 0 < len(some) < len(iou)
    np.testing.assert_array_equal(same_iou, iou)
    np.testing.assert_allclose(some_masks, masks[some], atol=1e-5)


def test_records_equal_when_the_iou_filter_splits_the_prompts(models, predictor):
    """A pred_iou_thresh between the scores: the decoder skips the rejected prompts' masks
    and the records still equal segment_anything's."""
    img = _synthetic()
    predictor.set_image(img)
    _, scores = predictor.predict_batch(*_grid_args(img, 8))
    settings = dict(points_per_side=8, pred_iou_thresh=float(np.quantile(scores, 0.7)),
                    stability_score_thresh=0.0, box_nms_thresh=1.0)
    want = SamAutomaticMaskGenerator(models["sam"], **settings).generate(img)
    got = SamOnnxAutomaticMaskGenerator(predictor, **settings).generate(img)
    assert 3 < len(got) < scores.size * 0.5
    parity = compare_records(want, got)
    assert parity.passed, parity


@pytest.mark.parametrize("settings", [
    dict(points_per_side=8, **KEEPING),
    dict(points_per_side=4, crop_n_layers=1, crop_nms_thresh=1.0, **KEEPING),
    dict(points_per_side=8),  # the defaults: random weights leave (almost) nothing
], ids=["keeping", "crops", "defaults"])
def test_records_equal_segment_anything_generator(models, predictor, settings):
    for name, img in _images():
        want = SamAutomaticMaskGenerator(models["sam"], **settings).generate(img)
        got = SamOnnxAutomaticMaskGenerator(predictor, **settings).generate(img)
        parity = compare_records(want, got)
        assert parity.passed, (name, parity)
        assert parity.max_score_diff < 1e-3, (name, parity)
        if settings.get("pred_iou_thresh") == 0.0:
            assert len(got) > 3, name  # the comparison covered real records
        for record in got:
            assert set(record) == set(want[0]) if want else True
            assert record["segmentation"].shape == img.shape[:2]


def test_every_decoder_contract_gives_the_same_records(models, predictor):
    img = _synthetic()
    settings = dict(points_per_side=4, **KEEPING)
    batched = SamOnnxAutomaticMaskGenerator(predictor, **settings).generate(img)
    official = SamOnnxAutomaticMaskGenerator((models["encoder"], models["official"]),
                                             **settings).generate(img)
    assert compare_records(batched, official).passed


def test_output_modes_hold_the_same_masks(predictor):
    img = _synthetic()
    base = dict(points_per_side=4, **KEEPING)
    binary = SamOnnxAutomaticMaskGenerator(predictor, **base).generate(img)
    rle = SamOnnxAutomaticMaskGenerator(predictor, output_mode="uncompressed_rle",
                                        **base).generate(img)
    coco = SamOnnxAutomaticMaskGenerator(predictor, output_mode="coco_rle", **base).generate(img)
    for b, r, c in zip(binary, rle, coco):
        np.testing.assert_array_equal(amg.rle_to_mask(r["segmentation"]), b["segmentation"])
        assert amg.coco_decode_rle(c["segmentation"]) == r["segmentation"]


def test_small_region_cleanup_equals_segment_anything(models, predictor):
    """segment_anything does it with OpenCV (a test-only dependency here), sam-onnx with scipy."""
    img = _synthetic()
    settings = dict(points_per_side=4, min_mask_region_area=2000, **KEEPING)
    want = SamAutomaticMaskGenerator(models["sam"], **settings).generate(img)
    got = SamOnnxAutomaticMaskGenerator(predictor, **settings).generate(img)
    plain = SamOnnxAutomaticMaskGenerator(predictor, **KEEPING, points_per_side=4).generate(img)
    assert compare_records(want, got).passed
    assert any(not np.array_equal(a["segmentation"], b["segmentation"])
               for a, b in zip(got, plain)), "the clean-up changed no mask: a weak test"


@pytest.mark.parametrize("kwargs, words", [
    (dict(points_per_side=None), "exactly one of points_per_side or point_grids"),
    (dict(output_mode="png"), "unknown output_mode"),
    (dict(points_per_batch=0), "points_per_batch must be at least 1"),
    (dict(crop_n_layers=2, points_per_side=None, point_grids=[amg.build_point_grid(4)]),
     "needs 3"),
])
def test_bad_generator_settings_get_clear_errors(predictor, kwargs, words):
    with pytest.raises(SamOnnxError, match=words):
        SamOnnxAutomaticMaskGenerator(predictor, **kwargs)


def test_generator_runs_with_torch_unimportable(models):
    code = f"""
import sys
for name in ("torch", "torchvision", "segment_anything"):
    sys.modules[name] = None
import numpy as np
from sam_onnx.runtime.automatic import SamOnnxAutomaticMaskGenerator
gen = SamOnnxAutomaticMaskGenerator(({str(models['encoder'])!r}, {str(models['batched'])!r}),
                                    points_per_side=3, pred_iou_thresh=0, stability_score_thresh=0)
records = gen.generate(np.full((90, 120, 3), 100, np.uint8))
print("records", len(records))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "records" in proc.stdout and proc.stdout.split()[-1] != "0"


def test_a_large_image_is_segmented(predictor):
    """A 3000x4000 tile: logits are upscaled a bounded chunk at a time."""
    img = np.tile(_synthetic(300, 400), (10, 10, 1))
    records = SamOnnxAutomaticMaskGenerator(predictor, points_per_side=2, **KEEPING,
                                            output_mode="coco_rle").generate(img)
    assert records and all(r["segmentation"]["size"] == [3000, 4000] for r in records)


# -- sam-onnx segment -------------------------------------------------------------------------
def test_segment_command_writes_coco_json_and_overlays(models, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_synthetic()).save(folder / "a.png")
    Image.fromarray(_synthetic(200, 150)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    proc = run_cli("segment", folder, "--encoder", models["encoder"], "--decoder",
                   models["batched"], "--out", out, "--points-per-side", "4",
                   "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for stem, size in (("a", [256, 384]), ("b", [200, 150])):
        doc = json.loads((out / f"{stem}.json").read_text())
        assert [doc["image"]["height"], doc["image"]["width"]] == size
        assert doc["annotations"], stem
        ann = doc["annotations"][0]
        assert set(ann) == {"id", "segmentation", "area", "bbox", "predicted_iou",
                            "point_coords", "stability_score", "crop_box"}
        mask = amg.rle_to_mask(amg.coco_decode_rle(ann["segmentation"]))
        assert mask.sum() == ann["area"] and list(mask.shape) == size
        assert Image.open(out / f"{stem}.png").size == (size[1], size[0])


def test_segment_command_bad_input(models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    dup = tmp_path / "dup"
    dup.mkdir()
    Image.fromarray(_synthetic()).save(dup / "x.png")
    Image.fromarray(_synthetic()).save(tmp_path / "x.jpg")
    common = ["--encoder", models["encoder"], "--decoder", models["batched"], "--out",
              tmp_path / "out"]
    cases = [
        ([tmp_path / "missing.jpg"], "does not exist"),
        ([empty], "holds no images"),
        ([dup, tmp_path / "x.jpg"], "would both write x.json"),
    ]
    for inputs, words in cases:
        proc = run_cli("segment", *inputs, *common)
        assert proc.returncode == 1 and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = run_cli("segment", dup, *common, "--points-per-side", "0")
    assert proc.returncode == 2 and "points-per-side" in proc.stderr
    proc = run_cli("segment", dup, "--encoder", models["batched"], "--decoder",
                   models["batched"], "--out", tmp_path / "out")
    assert proc.returncode == 1 and "not an image encoder" in proc.stderr
    assert not (tmp_path / "out" / "x.json").exists()
