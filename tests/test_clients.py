"""Graphs for the clients people already run, and other exporters' graphs (#15): the
single-mask decoder, the image-input encoder, segment-anything's own export (its frozen crop),
and every fix validate prints, run as printed."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli
from PIL import Image
from segment_anything import SamPredictor

import sam_onnx
from sam_onnx.exporter.checkpoints import build, load_state_dict
from sam_onnx.graph import metadata
from sam_onnx.runtime.images import synthetic
from sam_onnx.runtime.predictor import SamOnnxPredictor

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"

#: segment-anything's scripts/export_onnx_model.py, its export as written (the script is not in
#: the wheel; bench --peers makes it the same way): its own SamOnnxModel, dummy inputs
#: (orig_im_size 1500x2250), names, dynamic axes, opset 17, the TorchScript exporter.
#: argv: checkpoint, output, "single" or "four".
OFFICIAL_SCRIPT = """
import sys
from sam_onnx.exporter.checkpoints import build, load_state_dict
from sam_onnx.tools.peers import official_decoder
official_decoder(build("tiny", load_state_dict(sys.argv[1])), sys.argv[2],
                 single=sys.argv[3] == "single")
"""


@pytest.fixture(scope="module")
def official_script(tiny_checkpoint, tmp_path_factory):
    """segment-anything's default and --return-single-mask exports of the tiny model."""
    out = tmp_path_factory.mktemp("official_script")
    paths = {}
    for kind in ("four", "single"):
        paths[kind] = out / f"sam_onnx_{kind}.onnx"
        proc = subprocess.run([sys.executable, "-c", OFFICIAL_SCRIPT, str(tiny_checkpoint),
                               str(paths[kind]), kind], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return paths


@pytest.fixture(scope="module")
def client_export(tiny_checkpoint, tmp_path_factory):
    """sam-onnx's files for AnyLabeling and the notebook: the image-input encoder and the
    single-mask decoder, through the command line."""
    out = tmp_path_factory.mktemp("client_export")
    proc = run_cli("export", "--model", "tiny", "--checkpoint", tiny_checkpoint, "--out", out,
                   "--encoder-contract", "image", "--return-single-mask")
    assert proc.returncode == 0, proc.stderr
    return {"encoder": out / "tiny_encoder_image.onnx",
            "decoder": out / "tiny_decoder_official_single.onnx",
            "sam": build("tiny", load_state_dict(tiny_checkpoint))}


def _images():
    out = [("synthetic landscape", synthetic(300, 500)),
           ("synthetic portrait", synthetic(500, 300))]
    if (IMAGES / "truck.jpg").exists():
        truck = np.asarray(Image.open(IMAGES / "truck.jpg").convert("RGB"))
        out += [("truck", truck), ("truck portrait", np.ascontiguousarray(truck.swapaxes(0, 1)))]
    return out


def test_the_official_scripts_exports_are_recognised(official_script, tmp_path):
    """Its default, --return-single-mask and --quantize-out files (quantize_dynamic with the
    script's arguments, less optimize_model, which this onnxruntime no longer takes)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quantize import quantize_dynamic

    for kind, contract in (("four", "official"), ("single", "official_single")):
        quantized = tmp_path / f"{kind}.quant.onnx"
        quantize_dynamic(official_script[kind], quantized, per_channel=False,
                         reduce_range=False, weight_type=QuantType.QUInt8)
        for graph in (official_script[kind], quantized):
            report = sam_onnx.validate(graph, feed="official")
            assert report.ok, report.to_text()
            assert f"matches the {contract} contract" in report.to_text()


def _fix_command(report, code):
    (finding,) = [f for f in report.findings if f.code == code]
    args = shlex.split(finding.fix)
    assert args[0] == "sam-onnx", finding.fix
    return args[1:]


@pytest.mark.parametrize("kind", ["four", "single"])
def test_a_frozen_crop_is_found_and_the_printed_fix_makes_masks_right_at_every_size(
        official_script, client_export, kind, tmp_path):
    """segment-anything 1.0's export crops at 1500x2250's aspect ratio; validate --run says
    so with a fix, and the fix, run as printed, gives segment_anything's own masks at a
    portrait and a landscape size."""
    graph = tmp_path / official_script[kind].name
    graph.write_bytes(official_script[kind].read_bytes())
    report = sam_onnx.validate(graph, run=True)
    assert "SAM042" in report.codes() and not report.ok
    proc = run_cli(*_fix_command(report, "SAM042"))
    assert proc.returncode == 0, proc.stderr
    fixed = tmp_path / f"{graph.stem}.fixed.onnx"
    assert sam_onnx.validate(fixed, feed="official", run=True).ok
    sam = client_export["sam"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for size in ((1800, 1200), (600, 1400)):
        feed = {"image_embeddings": rng.standard_normal((1, 256, 64, 64)).astype(np.float32),
                "point_coords": np.array([[[400.0, 300.0], [0.0, 0.0]]], np.float32),
                "point_labels": np.array([[1.0, -1.0]], np.float32),
                "mask_input": np.zeros((1, 1, 256, 256), np.float32),
                "has_mask_input": np.zeros(1, np.float32),
                "orig_im_size": np.array(size, np.float32)}
        masks, _, low_res = session.run(None, feed)
        h, w = size
        scale = 1024 / max(h, w)
        input_size = (int(h * scale + 0.5), int(w * scale + 0.5))
        with torch.inference_mode():
            want = sam.postprocess_masks(torch.from_numpy(low_res), input_size, size).numpy()
        np.testing.assert_allclose(masks, want, atol=1e-4)


def test_image_encoder_matches_sam_predictors_embedding_in_both_orientations(client_export):
    predictor = SamOnnxPredictor(client_export["encoder"], client_export["decoder"])
    reference = SamPredictor(client_export["sam"])
    for name, image in _images():
        predictor.set_image(image)
        reference.set_image(image)
        np.testing.assert_allclose(predictor.features, reference.features.numpy(), atol=1e-4,
                                   err_msg=name)
    record = metadata.read(onnx.load(str(client_export["encoder"]), load_external_data=False))
    assert record["contract"] == "encoder_image"
    assert record["contract_spec"]["preprocess_inside"] is True


def test_single_mask_decoder_returns_segment_anythings_choice(client_export):
    """One click and the padding point: the best of the three multimask outputs; two clicks
    and the padding point: the single-mask token (select_masks)."""
    predictor = SamOnnxPredictor(client_export["encoder"], client_export["decoder"])
    reference = SamPredictor(client_export["sam"])
    image = synthetic(400, 600)
    predictor.set_image(image)
    reference.set_image(image)
    for coords, labels, multimask in (([[300, 200]], [1], True),
                                      ([[300, 200], [100, 50]], [1, 0], False)):
        coords, labels = np.array(coords, float), np.array(labels)
        masks, scores, low_res = predictor.predict(coords, labels)
        want_masks, want_scores, want_low = reference.predict(coords, labels,
                                                              multimask_output=multimask)
        best = int(np.argmax(want_scores)) if multimask else 0
        assert masks.shape == (1, 400, 600) and low_res.shape == (1, 256, 256)
        np.testing.assert_allclose(scores, want_scores[best:best + 1], atol=1e-4)
        np.testing.assert_allclose(low_res, want_low[best:best + 1], atol=1e-4)
        # the low-res logits go back in as the next mask prompt (the notebook's refinement)
        refined, _, _ = predictor.predict(coords, labels, mask_input=low_res)
        assert refined.shape == (1, 400, 600)


def test_the_automatic_mask_generator_runs_a_single_mask_decoder(client_export):
    generator = sam_onnx.SamOnnxAutomaticMaskGenerator(
        SamOnnxPredictor(client_export["encoder"], client_export["decoder"]),
        points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0)
    records = generator.generate(synthetic(200, 300))
    assert records and all(r["segmentation"].shape == (200, 300) for r in records)
    assert len(records) <= 16  # one mask a point at most


def test_samexporters_single_mask_decoder_is_recognised_and_its_crop_found(samexporter_code,
                                                                           tmp_path):
    """samexporter's own export_decoder.run_export (--return-single-mask, its documented
    flow) on a vit_b checkpoint of random weights from segment_anything's registry."""
    checkpoint = tmp_path / "sam_vit_b.pth"
    decoder = tmp_path / "samexporter_decoder.onnx"
    script = (
        "import sys, torch\n"
        "from segment_anything import sam_model_registry\n"
        "torch.manual_seed(0)\n"
        "torch.save(sam_model_registry['vit_b'](checkpoint=None).state_dict(), sys.argv[1])\n"
        "from samexporter.export_decoder import run_export\n"
        "run_export(model_type='vit_b', checkpoint=sys.argv[1], output=sys.argv[2], opset=18,\n"
        "           return_single_mask=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(decoder)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(samexporter_code)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = sam_onnx.validate(decoder, feed="official", run=True)
    assert "matches the official_single contract" in report.to_text()
    assert "SAM042" in report.codes()


def test_samexporters_preprocessing_encoder_is_recognised_and_run(client_export,
                                                                  samexporter_code, tmp_path):
    """samexporter 0.5.0's ImageEncoderOnnxModel(use_preprocess=True), exported as its
    export_encoder does (the input_image HxWx3 form AnyLabeling feeds), from its wheel."""
    encoder = tmp_path / "samexporter_encoder.onnx"
    script = (
        "import sys, torch\n"
        "from samexporter.onnx_utils import ImageEncoderOnnxModel\n"
        "from sam_onnx.exporter.checkpoints import build, load_state_dict\n"
        "sam = build('tiny', torch.load(sys.argv[1]))\n"
        "model = ImageEncoderOnnxModel(model=sam, use_preprocess=True,\n"
        "    pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])\n"
        "torch.onnx.utils.export(model, (torch.randn((1024, 1024, 3)),), sys.argv[2],\n"
        "    export_params=True, opset_version=18, do_constant_folding=True,\n"
        "    input_names=['input_image'], output_names=['image_embeddings'],\n"
        "    dynamic_axes={'input_image': {0: 'image_height', 1: 'image_width'}})\n")
    checkpoint = tmp_path / "tiny.pth"
    torch.save(client_export["sam"].state_dict(), checkpoint)
    proc = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(encoder)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(samexporter_code)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "matches the encoder_image contract" in sam_onnx.validate(encoder).to_text()
    ours = SamOnnxPredictor(client_export["encoder"], client_export["decoder"])
    theirs = SamOnnxPredictor(encoder, client_export["decoder"])
    image = synthetic(500, 300)
    ours.set_image(image)
    theirs.set_image(image)
    np.testing.assert_allclose(theirs.features, ours.features, atol=1e-4)


def test_check_passes_the_client_graphs_against_segment_anything(client_export, tiny_checkpoint):
    """check compares the image-input encoder and the single-mask decoder with SamPredictor
    (the decoder against the mask select_masks picks of PyTorch's four)."""
    proc = run_cli("check", "--model", "tiny", "--checkpoint", tiny_checkpoint,
                   "--encoder", client_export["encoder"], "--decoder", client_export["decoder"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "PASS" in proc.stdout and "box" in proc.stdout


def test_samexporters_inference_runs_the_anylabeling_files_as_they_are(client_export,
                                                                        samexporter_code,
                                                                        tmp_path):
    """The client side: samexporter 0.5.0's SegmentAnythingONNX (AnyLabeling's SAM runner
    came from it) loads sam-onnx's image-input encoder and single-mask decoder unchanged and
    gets sam-onnx's predictor's embedding and mask, on a portrait image."""
    image = synthetic(500, 300)
    Image.fromarray(image).save(tmp_path / "image.png")
    out = tmp_path / "theirs.npz"
    script = (
        "import sys, cv2, numpy as np\n"
        "from samexporter.sam_onnx import SegmentAnythingONNX\n"
        "model = SegmentAnythingONNX(sys.argv[1], sys.argv[2], ['CPUExecutionProvider'])\n"
        "embedding = model.encode(cv2.imread(sys.argv[3]))\n"
        "masks = model.predict_masks(embedding, [{'type': 'point', 'data': [150, 200],\n"
        "                                          'label': 1}])\n"
        "np.savez(sys.argv[4], embedding=embedding['image_embedding'], masks=masks)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(client_export["encoder"]),
                           str(client_export["decoder"]), str(tmp_path / "image.png"), str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(samexporter_code)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = np.load(out)
    ours = SamOnnxPredictor(client_export["encoder"], client_export["decoder"])
    ours.set_image(image)
    masks, _, _ = ours.predict(np.array([[150.0, 200.0]]), np.array([1]), return_logits=True)
    np.testing.assert_allclose(theirs["embedding"], ours.features, atol=1e-4)
    # samexporter 0.5.0 upscales low_res_masks itself (to dodge the frozen crop), with
    # OpenCV's resize: the same mask, logits equal to resampling differences
    assert theirs["masks"].shape == (1, 1, 500, 300)
    assert np.mean((theirs["masks"][0] > 0) == (masks > 0)) > 0.999
    np.testing.assert_allclose(theirs["masks"][0], masks, atol=0.05)
