"""SamOnnxPredictor against segment_anything's SamPredictor on the same random weights."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from segment_anything import SamPredictor

import sam_onnx
from sam_onnx.core.errors import SamOnnxError
from sam_onnx.core.parity import mask_iou
from sam_onnx.exporter.checkpoints import build, load_state_dict
from sam_onnx.families.sam.contracts import DECODER_LOWRES, DECODER_OFFICIAL
from sam_onnx.runtime.images import synthetic
from sam_onnx.runtime.predictor import SamOnnxPredictor

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
LOGIT_ATOL = 1e-4  # the contracts' fp32 tolerance, on logits of random weights (|x| < ~1)


@pytest.fixture(scope="module")
def models(tiny_export, tiny_checkpoint, tmp_path_factory):
    out, _ = tiny_export
    lowres = tmp_path_factory.mktemp("lowres")
    sam_onnx.export("tiny", checkpoint=tiny_checkpoint, out_dir=lowres, encoder=False,
                    decoder_contract="lowres", isolate=False)
    sam = build("tiny", load_state_dict(tiny_checkpoint))
    return {"encoder": out / "tiny_encoder.onnx", "official": out / "tiny_decoder_official.onnx",
            "lowres": lowres / "tiny_decoder_lowres.onnx", "torch": SamPredictor(sam)}


def _synthetic(h=300, w=500):
    return synthetic(h, w)


def _images():
    out = [("synthetic 300x500", _synthetic())]
    for name in ("dog.jpg", "truck.jpg", "landsat-rmnp.tif"):
        if (IMAGES / name).exists():
            out.append((name, np.asarray(Image.open(IMAGES / name).convert("RGB"))))
    return out


def _prompts(h, w):
    return {
        "points": dict(point_coords=np.array([[w * 0.5, h * 0.5], [w * 0.2, h * 0.3]]),
                       point_labels=np.array([1, 0])),
        "box": dict(box=np.array([w * 0.25, h * 0.2, w * 0.75, h * 0.8])),
        "points+box": dict(point_coords=np.array([[w * 0.5, h * 0.5]]), point_labels=np.array([1]),
                           box=np.array([w * 0.25, h * 0.2, w * 0.75, h * 0.8])),
    }


@pytest.mark.parametrize("decoder", ["official", "lowres"])
def test_parity_with_sam_predictor(models, decoder):
    onnx_pred = SamOnnxPredictor(models["encoder"], models[decoder])
    torch_pred = models["torch"]
    for name, img in _images():  # the real ones only where ../shared/data/images exists
        onnx_pred.set_image(img)
        torch_pred.set_image(img)
        np.testing.assert_allclose(onnx_pred.get_image_embedding(),
                                   torch_pred.get_image_embedding().numpy(), atol=1e-4, rtol=1e-3)
        h, w = img.shape[:2]
        for prompt_name, prompt in _prompts(h, w).items():
            for multimask in (True, False):
                got = onnx_pred.predict(**prompt, multimask_output=multimask, return_logits=True)
                want = torch_pred.predict(**prompt, multimask_output=multimask, return_logits=True)
                _assert_same(got, want, f"{name} {prompt_name} multimask={multimask}")
                binary = onnx_pred.predict(**prompt, multimask_output=multimask)[0]
                t_binary = torch_pred.predict(**prompt, multimask_output=multimask)[0]
                assert binary.dtype == bool and binary.shape == t_binary.shape
                assert min(mask_iou(m, t) for m, t in zip(binary, t_binary)) >= 0.99
            # refinement: feed back the best low-res logits, as SamPredictor users do
            low_res = got[2][np.argmax(got[1])][None]
            got = onnx_pred.predict(**prompt, mask_input=low_res, return_logits=True)
            want = torch_pred.predict(**prompt, mask_input=low_res, return_logits=True)
            _assert_same(got, want, f"{name} {prompt_name} refined")


def _assert_same(got, want, what):
    masks, scores, low_res = got
    t_masks, t_scores, t_low_res = want
    assert masks.shape == t_masks.shape, what
    np.testing.assert_allclose(low_res, t_low_res, atol=LOGIT_ATOL, err_msg=what)
    np.testing.assert_allclose(scores, t_scores, atol=LOGIT_ATOL, err_msg=what)
    for m, t in zip(masks, t_masks):
        assert mask_iou(m, t) >= 0.99, what


def test_binary_masks_embeddings_round_trip_and_reset(models, tmp_path):
    pred = SamOnnxPredictor(models["encoder"], models["official"])
    img = _synthetic()
    pred.set_image(img)
    masks, scores, low_res = pred.predict(np.array([[250, 150]]), np.array([1]))
    assert masks.dtype == bool and masks.shape == (3, 300, 500) and scores.shape == (3,)
    assert low_res.shape == (3, 256, 256)
    pred.save_embedding(tmp_path / "emb.npz")
    only_decoder = SamOnnxPredictor(None, models["official"])
    only_decoder.load_embedding(tmp_path / "emb.npz")
    again = only_decoder.predict(np.array([[250, 150]]), np.array([1]))
    np.testing.assert_array_equal(again[0], masks)
    pred.reset_image()
    with pytest.raises(SamOnnxError, match="set_image"):
        pred.predict(np.array([[1, 1]]), np.array([1]))


def test_the_encoder_keeps_its_memory_between_images_unless_told(models, monkeypatch):
    """Kept by default from the second image on (the first run's goes back, for ONNX
    Runtime's memory pattern); handed back after each image with release_memory=True; the
    embeddings are the same either way."""
    asked, features = [], []
    for release in (False, True):
        pred = SamOnnxPredictor(models["encoder"], models["official"], release_memory=release)
        run = pred.encoder.run

        def recording_run(*args, release_memory=False, run=run):
            asked.append(release_memory)
            return run(*args, release_memory=release_memory)

        monkeypatch.setattr(pred.encoder, "run", recording_run)
        for _ in range(3):
            pred.set_image(_synthetic())
            features.append(pred.features)
    assert asked == [True, False, False, True, True, True]
    for f in features[1:]:
        np.testing.assert_array_equal(features[0], f)


def test_decoder_sessions_hold_only_what_each_prompt_needs(models, tmp_path):
    """An official graph runs only up to low_res_masks (the predictor upscales in numpy),
    its weights outside the file or not; prompts without a mask run with the mask inputs
    bound to "no mask", and what that graph computes from the image alone runs once an
    image; a mask prompt runs the whole graph. Both answer as the graph run whole does."""
    import onnxruntime as ort

    from sam_onnx.runtime import transforms
    from sam_onnx.tools.repair import repair

    outside = repair(models["official"], tmp_path / "ext.onnx", external_data=True).output
    pred = SamOnnxPredictor(models["encoder"], outside)
    assert {o.name for o in pred.decoder.inner.get_outputs()} == set(DECODER_LOWRES.output_names)
    assert pred._image_part.input_names == ["image_embeddings"]
    assert pred.decoder.input_names == [  # the prompt's, and the image part's results
        n for n in DECODER_OFFICIAL.input_names if n not in (
            "image_embeddings", "mask_input", "has_mask_input")] + pred._image_part.output_names
    image_runs = []
    run_image_part = pred._image_part.run
    pred._image_part.run = lambda *a, **k: image_runs.append(1) or run_image_part(*a, **k)
    pred.set_image(_synthetic())
    whole = ort.InferenceSession(str(models["official"]), providers=["CPUExecutionProvider"])
    box = np.array([100, 60, 400, 240])

    def whole_graph(mask):
        low, scores = whole.run(["low_res_masks", "iou_predictions"], {
            "image_embeddings": pred.features,
            "point_coords": transforms.apply_coords(box.reshape(1, 2, 2).astype(float),
                                                    pred.original_size,
                                                    pred.family.preprocess).astype(np.float32),
            "point_labels": np.array([[2, 3]], np.float32),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32) if mask is None else mask[None],
            "has_mask_input": np.array([mask is not None], np.float32),
            "orig_im_size": np.array(pred.original_size, np.float32)})
        return low[0, 1:], scores[0, 1:]

    _, scores, low = pred.predict(box=box)
    want_low, want_scores = whole_graph(None)
    np.testing.assert_allclose(low, want_low, atol=1e-5)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    _, refined_scores, refined = pred.predict(box=box, mask_input=low[:1])
    want_low, want_scores = whole_graph(low[:1])
    assert np.abs(refined - low).max() > 1e-3  # the mask prompt changes the answer
    np.testing.assert_allclose(refined, want_low, atol=1e-5)
    np.testing.assert_allclose(refined_scores, want_scores, atol=1e-5)
    assert image_runs == [1]  # one image, three prompts


def test_a_decoder_on_a_device_runs_whole(models, monkeypatch):
    """Where the decoder's sessions would run on a GPU, the image part's results would
    cross to the host and back with every prompt: the decoder runs whole there (not split,
    and no session built for the part), and answers the same."""
    from sam_onnx.runtime import predictor as predictor_module

    split = SamOnnxPredictor(models["encoder"], models["official"])
    monkeypatch.setattr(predictor_module, "runnable_providers",
                        lambda config: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(predictor_module.repair_passes, "split_at_inputs", None)  # not called
    whole = SamOnnxPredictor(models["encoder"], models["official"])
    assert split._image_part is not None and whole._image_part is None
    assert "image_embeddings" in whole.decoder.input_names
    img = _synthetic()
    answers = []
    for pred in (split, whole):
        pred.set_image(img)
        answers.append(pred.predict(np.array([[200, 150]]), np.array([1])))
    for got, want in zip(*answers):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("prompt, words", [
    (dict(point_coords=np.array([1, 2]), point_labels=np.array([1])), "Nx2"),
    (dict(point_coords=np.array([[1, 2]]), point_labels=np.array([7])),
     r"point label 7 is not a SAM label \(1 foreground, 0 background, 2 a box's top-left "
     r"corner, 3 a box's bottom-right corner, -1 padding, ignored\)"),
    (dict(point_coords=np.array([[1, 2]]), point_labels=np.array([-1])), "every point is "
     r"labelled -1 \(padding, which SAM ignores\)"),
    (dict(point_coords=np.array([[1, 2]]), point_labels=np.array([2])), "come in pairs"),
    (dict(point_coords=np.array([[1, 2], [3, 4]]), point_labels=np.array([3, 2])),
     "come in pairs"),
    (dict(point_coords=np.array([[np.nan, 2]]), point_labels=np.array([1])), "NaN"),
    (dict(point_coords=np.array([[5000, 2]]), point_labels=np.array([1])), "far outside"),
    (dict(point_coords=np.array([[1, 2]])), "go together"),
    (dict(box=np.array([1, 2, 3])), "x0, y0, x1, y1"),
    (dict(), "give a prompt"),
    (dict(box=np.array([1, 2, 30, 40]), mask_input=np.zeros((64, 64))), "1x256x256"),
])
def test_bad_prompts_get_clear_errors(models, prompt, words):
    pred = SamOnnxPredictor(models["encoder"], models["official"])
    pred.set_image(_synthetic())
    with pytest.raises(SamOnnxError, match=words):
        pred.predict(**prompt)


def test_padding_points_with_a_box_are_a_prompt(models):
    """Only -1 labels are refused when there is nothing else; with a box they are padding,
    as SamPredictor takes them."""
    pred = SamOnnxPredictor(models["encoder"], models["official"])
    pred.set_image(_synthetic())
    masks, scores, _ = pred.predict(np.array([[1, 2]]), np.array([-1]),
                                    box=np.array([100, 60, 400, 240]), multimask_output=False)
    assert masks.shape == (1, 300, 500) and scores.shape == (1,)


def test_images_in_every_form_give_the_same_embedding(models, tmp_path):
    pred = SamOnnxPredictor(models["encoder"], models["official"])
    rgb = _synthetic(64, 96)

    def embed(image, **kw):
        pred.set_image(image, **kw)
        return pred.get_image_embedding().copy()

    reference = embed(rgb)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    np.testing.assert_array_equal(embed(tmp_path / "img.png"), reference)
    np.testing.assert_array_equal(embed(Image.fromarray(rgb)), reference)
    np.testing.assert_array_equal(embed(rgb[..., ::-1].copy(), image_format="BGR"), reference)
    rgba = np.concatenate([rgb, np.full((64, 96, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(embed(rgba), reference)
    np.testing.assert_array_equal(embed(rgb.astype(np.uint16) * 257), reference)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(embed(gray), embed(np.repeat(gray[..., None], 3, -1)))
    # EXIF orientation 6 (rotate 90 clockwise to display) is applied for files
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    pred.set_image(tmp_path / "rotated.jpg")
    assert pred.original_size == (96, 64)


def test_runtime_runs_with_torch_unimportable(models, tmp_path):
    code = f"""
import sys
for name in ("torch", "torchvision", "segment_anything"):
    sys.modules[name] = None  # any import of these now raises ImportError
import numpy as np
from sam_onnx.runtime.predictor import SamOnnxPredictor
p = SamOnnxPredictor({str(models['encoder'])!r}, {str(models['lowres'])!r})
p.set_image(np.full((120, 200, 3), 128, np.uint8))
masks, scores, _ = p.predict(np.array([[100, 60]]), np.array([1]))
assert masks.shape == (3, 120, 200)
print("ok without torch")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ok without torch" in proc.stdout


@pytest.mark.parametrize("name, fix", [
    ("orig_im_sizes", r"repair \S*odd.onnx -o \S*odd.official.onnx --auto --feed official"),
    ("image_size", r"run sam-onnx validate \S*odd.onnx$"),  # no repair makes that name out
])
def test_a_decoder_following_no_contract_is_refused_with_the_fix(models, tmp_path, name, fix):
    import onnx

    model = onnx.load(str(models["official"]))
    model.graph.input[5].name = name
    for node in model.graph.node:
        node.input[:] = [name if i == "orig_im_size" else i for i in node.input]
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "odd.onnx"))
    with pytest.raises(SamOnnxError, match=r"nearest official.*" + fix):
        SamOnnxPredictor(models["encoder"], tmp_path / "odd.onnx")


def _relabelled(decoder: Path, model_type: str, out: Path) -> Path:
    """The decoder as another size of the same family records it: same embeddings shape,
    other weights (a vit_b encoder and a vit_l decoder look exactly like this)."""
    import onnx

    from sam_onnx.graph import metadata

    model = onnx.load(str(decoder))
    metadata.write(model, {**metadata.read(model), "model_type": model_type})
    onnx.save(model, str(out))
    return out


def test_an_encoder_and_decoder_of_different_models_are_refused(models, tmp_path):
    vit_b = _relabelled(models["official"], "vit_b", tmp_path / "vit_b_decoder_official.onnx")
    with pytest.raises(SamOnnxError, match=r"is tiny but .*vit_b_decoder_official.onnx is vit_b"
                                           r".*use the encoder and decoder of one export"):
        SamOnnxPredictor(models["encoder"], vit_b)
    img = tmp_path / "img.png"
    Image.fromarray(_synthetic()).save(img)
    proc = run_cli("predict", img, "--encoder", models["encoder"], "--decoder", vit_b,
                   "--point", "100,100", "--out", tmp_path / "mask.png", "--providers", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "is vit_b" in proc.stderr
    assert not (tmp_path / "mask.png").exists()
    SamOnnxPredictor(None, vit_b)  # a decoder alone (embeddings loaded later) is not a pair


def test_a_decoder_without_its_weights_file_is_refused_with_the_fix(models, tmp_path):
    from sam_onnx.tools.repair import repair

    outside = repair(models["official"], tmp_path / "ext.onnx", external_data=True).output
    for data in tmp_path.glob("ext.onnx.*"):
        data.unlink()
    with pytest.raises(SamOnnxError, match=r"external data file ext\.onnx\.data is missing "
                                           r"beside ext\.onnx; copy ext\.onnx\.data next to"):
        SamOnnxPredictor(None, outside)


def test_predict_command_writes_mask_overlay_and_json(models, tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray(_synthetic()).save(img)
    proc = run_cli("predict", img, "--encoder", models["encoder"], "--decoder", models["official"],
                   "--point", "250,150", "--box", "100,60,400,240", "--out", tmp_path / "m.png",
                   "--overlay", tmp_path / "o.png", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    summary = json.loads(proc.stdout)
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert mask.shape == (300, 500) and set(np.unique(mask)) <= {0, 255}
    assert summary["masks"][summary["best"]]["area"] == int((mask == 255).sum())
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (300, 500, 3)
    assert summary["providers"] == ["CPUExecutionProvider"]


def test_predict_command_bad_arguments(models, tmp_path):
    base = ["predict", tmp_path / "none.png", "--encoder", models["encoder"], "--decoder",
            models["official"]]
    proc = run_cli(*base, "--point", "1,2")
    assert proc.returncode == 1 and "cannot read image" in proc.stderr
    proc = run_cli(*base, "--point", "1")
    assert proc.returncode == 2 and "--point takes 2 or 3" in proc.stderr
    proc = run_cli(*base)
    assert proc.returncode == 2 and "give a prompt" in proc.stderr


@pytest.mark.parametrize("decoder", ["official", "batched"])
def test_many_boxes_in_one_call_equal_single_calls_and_predict_torch(models, tiny_batched,
                                                                     decoder):
    """A detector's boxes, with and without a point each: predict_batch(boxes=) gives what B
    predict calls give, and what SamPredictor.predict_torch(boxes=) gives."""
    import torch

    path = tiny_batched if decoder == "batched" else models[decoder]
    predictor = SamOnnxPredictor(models["encoder"], path)
    image = _synthetic(400, 600)
    predictor.set_image(image)
    reference = models["torch"]
    reference.set_image(image)
    rng = np.random.default_rng(3)
    corner = rng.uniform(0, 350, (6, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(20, 200, (6, 2))], axis=1)
    points = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2
    for kwargs in (dict(boxes=boxes), dict(point_coords=points, point_labels=np.ones((6, 1)),
                                           boxes=boxes)):
        for multimask in (True, False):
            low_res, scores = predictor.predict_batch(multimask_output=multimask, **kwargs)
            for i in range(len(boxes)):
                single = dict(box=boxes[i])
                if "point_coords" in kwargs:
                    single.update(point_coords=points[i], point_labels=np.ones(1))
                _, want_scores, want_low = predictor.predict(multimask_output=multimask, **single)
                np.testing.assert_allclose(low_res[i], want_low, atol=LOGIT_ATOL)
                np.testing.assert_allclose(scores[i], want_scores, atol=LOGIT_ATOL)
            transform = reference.transform
            torch_boxes = torch.from_numpy(transform.apply_boxes(boxes, image.shape[:2])).float()
            torch_points = None
            if "point_coords" in kwargs:
                torch_points = (torch.from_numpy(transform.apply_coords(points, image.shape[:2]))
                                .float(), torch.ones(6, 1))
            with torch.inference_mode():
                _, want_scores, want_low = reference.predict_torch(
                    *(torch_points or (None, None)), boxes=torch_boxes,
                    multimask_output=multimask)
            np.testing.assert_allclose(low_res, want_low.numpy(), atol=LOGIT_ATOL)
            np.testing.assert_allclose(scores, want_scores.numpy(), atol=LOGIT_ATOL)


def test_many_box_prompts_that_do_not_fit_are_refused(models):
    predictor = SamOnnxPredictor(models["encoder"], models["official"])
    predictor.set_image(_synthetic())
    for kwargs, words in ((dict(boxes=np.zeros((3, 5))), "boxes must be Bx4"),
                          (dict(point_coords=np.zeros((2, 1, 2)), point_labels=np.ones((2, 1)),
                                boxes=np.zeros((3, 4))), "for 2 point prompts"),
                          (dict(), "give prompts"),
                          (dict(boxes=np.full((1, 4), np.nan)), "NaN")):
        with pytest.raises(SamOnnxError, match=words):
            predictor.predict_batch(**kwargs)
