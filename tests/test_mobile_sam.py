"""MobileSAM (vit_t) through the whole toolchain, against mobile_sam's own PyTorch code: a
random-weight checkpoint saved from mobile_sam's builder, exported, checked with `sam-onnx
check` against mobile_sam's SamPredictor and SamAutomaticMaskGenerator, validated, repaired,
segmented, and refused where it is mixed with another model."""
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli, save_random_weights
from PIL import Image

import sam_onnx
from sam_onnx.core.errors import CheckpointError
from sam_onnx.exporter.checkpoints import build, load_state_dict, load_weights
from sam_onnx.families import identify
from sam_onnx.graph import metadata
from sam_onnx.runtime.images import synthetic


@pytest.fixture(scope="module")
def vit_t_checkpoint(tmp_path_factory):
    """Random weights from mobile_sam's own builder, saved as mobile_sam.pt is."""
    from mobile_sam import sam_model_registry

    return save_random_weights(sam_model_registry, "vit_t",
                               tmp_path_factory.mktemp("vit_t") / "mobile_sam.pt", seed=3)


@pytest.fixture(scope="module")
def vit_t(vit_t_checkpoint, tmp_path_factory):
    """The encoder and batched decoder exported by the CLI, and the official decoder by the
    library; every graph checked against mobile_sam by the exporter itself."""
    out = tmp_path_factory.mktemp("vit_t_graphs")
    proc = run_cli("export", "--model", "vit_t", "--checkpoint", vit_t_checkpoint, "--out", out,
                   "--decoder-contract", "batched")
    assert proc.returncode == 0, proc.stderr
    sam_onnx.export("vit_t", checkpoint=vit_t_checkpoint, out_dir=out, encoder=False,
                    decoder_contract="official")
    return {"encoder": out / "vit_t_encoder.onnx", "batched": out / "vit_t_decoder_batched.onnx",
            "official": out / "vit_t_decoder_official.onnx", "checkpoint": vit_t_checkpoint}


def test_a_mobile_sam_checkpoint_is_recognised_by_its_shapes(vit_t_checkpoint, tiny_checkpoint):
    assert identify(load_state_dict(vit_t_checkpoint)) == "vit_t"
    with pytest.raises(CheckpointError, match=r"is a vit_t checkpoint, not vit_b: pass --model "
                                              r"vit_t"):
        load_weights("vit_b", vit_t_checkpoint)
    with pytest.raises(CheckpointError, match=r"is a tiny checkpoint, not vit_t: pass --model "
                                              r"tiny"):
        load_weights("vit_t", tiny_checkpoint)


def test_the_checkpoint_loads_into_mobile_sams_own_model(vit_t_checkpoint):
    from mobile_sam import SamPredictor

    sam = build("vit_t", load_state_dict(vit_t_checkpoint))
    assert type(sam.image_encoder).__name__ == "TinyViT"
    saved = torch.load(vit_t_checkpoint)
    for name, value in sam.state_dict().items():
        assert torch.equal(value, saved[name]), name
    SamPredictor(sam)  # mobile_sam's predictor takes it


def test_graphs_record_the_family_and_model(vit_t):
    for role in ("encoder", "official", "batched"):
        record = metadata.read(onnx.load(str(vit_t[role]), load_external_data=False))
        assert (record["family"], record["model_type"]) == ("mobile_sam", "vit_t")
        assert record["preprocess"]["image_size"] == 1024


def test_check_against_mobile_sams_predictor_and_generator(vit_t, tmp_path):
    """The batched decoder on one image (the three default shapes are tiny's test; the
    official decoder is the next test's), mobile_sam's SamAutomaticMaskGenerator record by
    record."""
    proc = run_cli("check", "--model", "vit_t", "--checkpoint", vit_t["checkpoint"],
                   "--encoder", vit_t["encoder"], "--decoder", vit_t["batched"], "--format",
                   "json", "--image", _image(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = _assert_checked_against_mobile_sam(proc.stdout)
    (row,) = [r for r in report["rows"] if r["stage"] == "automatic masks"]
    assert row["status"] == "pass" and row["value"] >= 0.99


def test_check_exports_with_random_weights_and_passes(tmp_path):
    """The issue's 'done when': check --model vit_t --random-weights --export-to DIR, which
    exports the official decoder and checks it against mobile_sam's predictor."""
    proc = run_cli("check", "--model", "vit_t", "--random-weights", "--export-to", tmp_path,
                   "--image", _image(tmp_path), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_checked_against_mobile_sam(proc.stdout)


def _assert_checked_against_mobile_sam(stdout: str) -> dict:
    report = json.loads(stdout)
    assert report["passed"] and report["model_type"] == "vit_t"
    stages = {r["stage"] for r in report["rows"] if r["status"] == "pass"}
    assert {"encoder", "decoder"} <= stages
    return report


def _image(folder, h=200, w=300):
    path = folder / "card.png"
    Image.fromarray(synthetic(h, w)).save(path)
    return path


def test_validate_and_repair_know_mobile_sam_graphs(vit_t, tiny_export, tmp_path):
    proc = run_cli("validate", vit_t["encoder"], vit_t["official"], "--format", "json")
    assert proc.returncode == 0, proc.stdout
    codes = [f["code"] for f in json.loads(proc.stdout)["findings"]]
    assert codes.count("SAM030") == 2 and "SAM035" in codes  # contracts matched, pair fits
    tiny_decoder = tiny_export[0] / "tiny_decoder_official.onnx"
    proc = run_cli("validate", vit_t["encoder"], tiny_decoder)
    assert proc.returncode == 1 and "SAM034" in proc.stdout  # another model's decoder
    result = sam_onnx.repair(vit_t["official"], tmp_path / "lowres.onnx", contract="lowres")
    assert result.parity.passed
    record = metadata.read(onnx.load(str(result.output), load_external_data=False))
    assert (record["contract"], record["model_type"]) == ("lowres", "vit_t")


def test_segment_and_predict_run_mobile_sam_graphs(vit_t, tmp_path):
    image = _image(tmp_path)
    proc = run_cli("segment", image, "--encoder", vit_t["encoder"], "--decoder", vit_t["batched"],
                   "--out", tmp_path / "seg", "--points-per-side", "8", "--pred-iou-thresh", "0",
                   "--stability-score-thresh", "0", "--providers", "cpu")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "seg" / "card.json").read_text())
    assert doc["annotations"] and doc["image"]["height"] == 200
    predictor = sam_onnx.SamOnnxPredictor(vit_t["encoder"], vit_t["official"])
    assert predictor.family.name == "mobile_sam"
    predictor.set_image(synthetic(200, 300))
    masks, scores, low_res = predictor.predict(np.array([[150, 100]]), np.array([1]))
    assert masks.shape == (3, 200, 300) and low_res.shape == (3, 256, 256)


def test_a_mobile_sam_encoder_with_a_sam_decoder_is_refused(vit_t, tiny_export):
    with pytest.raises(sam_onnx.SamOnnxError, match=r"is vit_t but .* is tiny"):
        sam_onnx.SamOnnxPredictor(vit_t["encoder"], tiny_export[0] / "tiny_decoder_official.onnx")
