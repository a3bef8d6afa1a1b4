"""HQ-SAM through the whole toolchain, against segment_anything_hq's own PyTorch code: Light
HQ-SAM (hq_vit_tiny: TinyViT encoder, HQ decoder) with random weights saved from
segment_anything_hq's builder, exported, checked against its SamPredictor (both switches) and
SamAutomaticMaskGenerator, validated (an HQ decoder fed SAM's feed names what is missing),
repaired, segmented, and refused beside another model's graphs."""
import json

import numpy as np
import onnx
import pytest
from conftest import rename_input, run_cli, save_random_weights
from PIL import Image

import sam_onnx
from sam_onnx.core.errors import CheckpointError
from sam_onnx.exporter.checkpoints import load_state_dict, load_weights
from sam_onnx.families import identify
from sam_onnx.graph import metadata
from sam_onnx.runtime.images import synthetic


@pytest.fixture(scope="module")
def hq_checkpoint(tmp_path_factory):
    """Random weights from segment_anything_hq's own builder, saved as sam_hq_vit_tiny.pth."""
    from sam_onnx.families.sam_hq.modeling import sam_model_registry

    return save_random_weights(sam_model_registry, "vit_tiny",
                               tmp_path_factory.mktemp("hq") / "sam_hq_vit_tiny.pth", seed=5)


@pytest.fixture(scope="module")
def hq(hq_checkpoint, tmp_path_factory):
    """Encoder and hq_official decoder by the CLI (--decoder-contract official picks HQ's
    own), the hq_batched decoder by the library; each checked by the exporter itself."""
    out = tmp_path_factory.mktemp("hq_graphs")
    proc = run_cli("export", "--model", "hq_vit_tiny", "--checkpoint", hq_checkpoint, "--out",
                   out)
    assert proc.returncode == 0, proc.stderr
    sam_onnx.export("hq_vit_tiny", checkpoint=hq_checkpoint, out_dir=out, encoder=False,
                    decoder_contract="batched")
    return {"encoder": out / "hq_vit_tiny_encoder.onnx",
            "official": out / "hq_vit_tiny_decoder_hq_official.onnx",
            "batched": out / "hq_vit_tiny_decoder_hq_batched.onnx", "checkpoint": hq_checkpoint}


def test_an_hq_checkpoint_is_told_from_sam_and_mobile_sam(hq_checkpoint, tiny_checkpoint):
    assert identify(load_state_dict(hq_checkpoint)) == "hq_vit_tiny"  # not MobileSAM's vit_t
    with pytest.raises(CheckpointError, match=r"is a hq_vit_tiny checkpoint, not vit_t"):
        load_weights("vit_t", hq_checkpoint)
    with pytest.raises(CheckpointError, match=r"is a tiny checkpoint, not hq_vit_b"):
        load_weights("hq_vit_b", tiny_checkpoint)


def test_the_graphs_declare_and_record_hq_contracts(hq):
    encoder = onnx.load(str(hq["encoder"]), load_external_data=False)
    assert [o.name for o in encoder.graph.output] == ["image_embeddings", "hq_features"]
    decoder = onnx.load(str(hq["official"]), load_external_data=False)
    names = [i.name for i in decoder.graph.input]
    assert names[:2] == ["image_embeddings", "hq_features"]
    assert names[-2:] == ["multimask_output", "hq_token_only"]
    record = metadata.read(decoder)
    assert (record["family"], record["model_type"], record["contract"]) == (
        "sam_hq", "hq_vit_tiny", "hq_official")


def test_check_against_segment_anything_hq(hq, tmp_path):
    """The batched decoder on one image (the three default shapes are tiny's test; the
    official decoder is the next test's), HQ's SamAutomaticMaskGenerator record by record."""
    proc = run_cli("check", "--model", "hq_vit_tiny", "--checkpoint", hq["checkpoint"],
                   "--encoder", hq["encoder"], "--decoder", hq["batched"], "--format", "json",
                   "--image", _card(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _assert_checked_against_hq(proc.stdout)
    (row,) = [r for r in rows if r["stage"] == "automatic masks"]
    assert row["status"] == "pass" and "records" in row["note"]


def test_check_exports_with_random_weights_and_passes(tmp_path):
    """The issue's 'done when': check --model hq_vit_tiny --random-weights --export-to DIR,
    which exports the official decoder and checks it against segment_anything_hq."""
    proc = run_cli("check", "--model", "hq_vit_tiny", "--random-weights", "--export-to",
                   tmp_path, "--image", _card(tmp_path), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_checked_against_hq(proc.stdout)


def _card(folder):
    path = folder / "card.png"
    Image.fromarray(synthetic(180, 260)).save(path)
    return path


def _assert_checked_against_hq(stdout: str) -> list:
    report = json.loads(stdout)
    assert report["passed"]
    rows = report["rows"]
    passed = {(r["stage"], r["output"]) for r in rows if r["status"] == "pass"}
    assert ("encoder", "hq_features") in passed
    assert any(r["case"].endswith("hq-only") and r["status"] == "pass" for r in rows)
    return rows


def test_predictor_switches_follow_segment_anything_hq(hq, tiny_export):
    from segment_anything_hq import SamPredictor

    from sam_onnx.exporter.checkpoints import build

    torch_pred = SamPredictor(build("hq_vit_tiny", load_state_dict(hq["checkpoint"])))
    onnx_pred = sam_onnx.SamOnnxPredictor(hq["encoder"], hq["official"])
    img = synthetic(240, 320)
    onnx_pred.set_image(img)
    torch_pred.set_image(img)
    point, label = np.array([[160, 120]]), np.array([1])
    outputs = {}
    for multimask in (True, False):
        for hq_only in (True, False):
            got = onnx_pred.predict(point, label, multimask_output=multimask,
                                    hq_token_only=hq_only, return_logits=True)
            want = torch_pred.predict(point, label, multimask_output=multimask,
                                      hq_token_only=hq_only, return_logits=True)
            assert got[0].shape == (1, 240, 320)  # one mask, as HQ's predictor returns
            np.testing.assert_allclose(got[2], want[2], atol=1e-4)
            np.testing.assert_allclose(got[1], want[1], atol=1e-4)
            outputs[multimask, hq_only] = got[2]
    assert not np.allclose(outputs[True, False], outputs[True, True])  # the switch matters
    sam_pred = sam_onnx.SamOnnxPredictor(tiny_export[0] / "tiny_encoder.onnx",
                                         tiny_export[0] / "tiny_decoder_official.onnx")
    sam_pred.set_image(img)
    with pytest.raises(sam_onnx.SamOnnxError, match="hq_token_only needs an HQ-SAM decoder"):
        sam_pred.predict(point, label, hq_token_only=True)


def test_an_hq_decoder_fed_sams_feed_names_what_is_missing(hq):
    report = sam_onnx.validate(hq["official"], feed="official")
    missing = {f.expected for f in report.findings if f.code == "SAM020"}
    assert missing == {"hq_features", "multimask_output", "hq_token_only"}
    assert sam_onnx.validate(hq["official"], feed="hq_official", run=True).ok
    assert "SAM030" in sam_onnx.validate(hq["batched"]).codes()


def test_hq_pairs_fit_and_an_hq_decoder_needs_hqs_encoder(hq, tiny_export):
    proc = run_cli("validate", hq["encoder"], hq["official"])
    assert proc.returncode == 0 and "SAM035" in proc.stdout, proc.stdout
    sam_encoder = tiny_export[0] / "tiny_encoder.onnx"
    proc = run_cli("validate", sam_encoder, hq["official"])
    assert proc.returncode == 1 and "takes hq_features, which" in proc.stdout
    with pytest.raises(sam_onnx.SamOnnxError, match="takes hq_features"):
        sam_onnx.SamOnnxPredictor(sam_encoder, hq["official"])


def test_repair_renames_an_hq_decoders_inputs_back(hq, tmp_path):
    rename_input(hq["official"], "hq_features", "hq_feature",
                 tmp_path / "renamed.onnx")
    assert not sam_onnx.validate(tmp_path / "renamed.onnx", feed="hq_official").ok
    result = sam_onnx.repair(tmp_path / "renamed.onnx", tmp_path / "fixed.onnx",
                             auto_feed="hq_official")
    assert result.changes == ["rename: renamed hq_feature to hq_features"]
    assert result.parity.passed and result.report.ok


def test_segment_runs_hq_graphs_and_save_embedding_keeps_the_hq_features(hq, tmp_path):
    Image.fromarray(synthetic(200, 300)).save(tmp_path / "card.png")
    proc = run_cli("segment", tmp_path / "card.png", "--encoder", hq["encoder"], "--decoder",
                   hq["batched"], "--out", tmp_path / "seg", "--points-per-side", "6",
                   "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--providers",
                   "cpu")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "seg" / "card.json").read_text())["annotations"]
    pred = sam_onnx.SamOnnxPredictor(hq["encoder"], hq["official"])
    pred.set_image(synthetic(200, 300))
    first = pred.predict(np.array([[150, 100]]), np.array([1]))[2]
    pred.save_embedding(tmp_path / "emb.npz")
    again = sam_onnx.SamOnnxPredictor(None, hq["official"])
    again.load_embedding(tmp_path / "emb.npz")
    assert set(again.encoded) == {"image_embeddings", "hq_features"}
    np.testing.assert_array_equal(again.predict(np.array([[150, 100]]), np.array([1]))[2], first)


def test_hq_batched_scores_every_prompt_and_masks_only_those_that_pass(hq):
    """hq_batched runs HQ's upscaler and mask features only for the prompts whose score passes
    pred_iou_thresh: their masks equal the ones computed for every prompt."""
    pred = sam_onnx.SamOnnxPredictor(hq["encoder"], hq["batched"])
    pred.set_image(synthetic(200, 300))
    xs, ys = np.meshgrid(np.linspace(20, 280, 4), np.linspace(20, 180, 4))
    points = np.stack([xs.ravel(), ys.ravel()], -1)[:, None, :]
    labels = np.ones((len(points), 1))
    every, scores, kept_every = pred.predict_batch_filtered(points, labels, -np.inf)
    np.testing.assert_array_equal(kept_every, np.arange(len(points)))
    threshold = float(np.median(scores))
    masks, again, kept = pred.predict_batch_filtered(points, labels, threshold)
    np.testing.assert_array_equal(again, scores)
    np.testing.assert_array_equal(kept, np.flatnonzero(scores[:, 0] > threshold))
    assert 0 < len(kept) < len(points)
    np.testing.assert_allclose(masks, every[kept], atol=1e-5)
    none, _, kept = pred.predict_batch_filtered(points, labels, float(scores.max()))
    assert none.shape == (0, 1, 256, 256) and len(kept) == 0  # no prompt passes: no masks
