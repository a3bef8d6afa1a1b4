"""SAM 2.1 (sam2.1_hiera_tiny) through the whole toolchain, against sam2's own PyTorch code:
random weights saved from sam2's build_sam2 in Meta's checkpoint layout, exported, checked with
`sam-onnx check` against SAM2ImagePredictor and SAM2AutomaticMaskGenerator (its own options
too: use_m2m, multimask_output), validated, repaired, segmented; and the graphs samexporter's
own export code makes (the form X-AnyLabeling loads) recognised and run."""
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import rename_input, run_cli
from PIL import Image

import sam_onnx
from sam_onnx.core.errors import CheckpointError
from sam_onnx.core.parity import compare_records
from sam_onnx.exporter.checkpoints import build, load_state_dict, load_weights
from sam_onnx.families import identify
from sam_onnx.families.sam2.blocks import to_blocks
from sam_onnx.graph import metadata
from sam_onnx.runtime.images import synthetic

MODEL = "sam2.1_hiera_tiny"
#: Settings that keep random weights' masks, so that records are compared one for one.
KEEP_ALL = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


def _save(model_type: str, path, seed: int):
    """Random weights from sam2's own build_sam2, saved as Meta's checkpoints are
    ({"model": state_dict})."""
    from sam2.build_sam import build_sam2

    from sam_onnx.families.sam2 import config

    torch.manual_seed(seed)
    torch.save({"model": build_sam2(config(model_type), None, device="cpu").state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _save(MODEL, tmp_path_factory.mktemp("sam2") / f"{MODEL}.pt", seed=3)


@pytest.fixture(scope="module")
def sam2(checkpoint, tmp_path_factory):
    """Encoder and sam2_official decoder by the CLI (--decoder-contract official picks SAM 2's
    own), the sam2_batched decoder by the library; each checked by the exporter itself."""
    out = tmp_path_factory.mktemp("sam2_graphs")
    proc = run_cli("export", "--model", MODEL, "--checkpoint", checkpoint, "--out", out)
    assert proc.returncode == 0, proc.stderr
    sam_onnx.export(MODEL, checkpoint=checkpoint, out_dir=out, encoder=False,
                    decoder_contract="batched")
    return {"encoder": out / f"{MODEL}_encoder.onnx",
            "official": out / f"{MODEL}_decoder_sam2_official.onnx",
            "batched": out / f"{MODEL}_decoder_sam2_batched.onnx", "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    return build(MODEL, load_state_dict(checkpoint), source=str(checkpoint))


@pytest.fixture(scope="module")
def samexporter(checkpoint, samexporter_code, tmp_path_factory):
    """The encoder and decoder samexporter 0.5.0's own export_sam2 writes, run from its
    wheel."""
    tmp = tmp_path_factory.mktemp("samexporter_sam2")
    enc, dec = tmp / "encoder.onnx", tmp / "decoder.onnx"
    proc = run_cli("--checkpoint", checkpoint, "--output_encoder", enc, "--output_decoder", dec,
                   "--model_type", MODEL, module="samexporter.export_sam2",
                   env={"PYTHONPATH": str(samexporter_code)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return enc, dec


@pytest.fixture(scope="module")
def onnxruntime_graphs(checkpoint, tmp_path_factory):
    """The encoder and both decoders ONNX Runtime's own SAM 2 export code writes
    (onnxruntime/transformers/models/sam2, shipped in its wheel). Its calls predate
    torch.onnx.export's dynamo default, so they run with dynamo=False, as they were written."""
    import onnxruntime

    code = Path(onnxruntime.__file__).parent / "transformers" / "models" / "sam2"
    out = tmp_path_factory.mktemp("ort_sam2")
    script = (
        "import functools, sys, torch\n"
        "torch.onnx.export = functools.partial(torch.onnx.export, dynamo=False)\n"
        "from sam_onnx.exporter.checkpoints import build, load_state_dict\n"
        "from image_decoder import export_decoder_onnx\n"
        "from image_encoder import export_image_encoder_onnx\n"
        f"model = build({MODEL!r}, load_state_dict(sys.argv[1]))\n"
        "export_image_encoder_onnx(model, sys.argv[2] + '/encoder.onnx')\n"
        "export_decoder_onnx(model, sys.argv[2] + '/decoder.onnx', multimask_output=False)\n"
        "export_decoder_onnx(model, sys.argv[2] + '/multimask.onnx', multimask_output=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(code)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {name: out / f"{name}.onnx" for name in ("encoder", "decoder", "multimask")}


def test_a_sam2_checkpoint_is_told_by_its_hiera_and_version(checkpoint, tmp_path,
                                                           tiny_checkpoint):
    assert identify(load_state_dict(checkpoint)) == MODEL
    v20 = _save("sam2_hiera_tiny", tmp_path / "sam2_hiera_tiny.pt", seed=1)
    assert identify(load_state_dict(v20)) == "sam2_hiera_tiny"  # 2.0: no spatial no-object
    with pytest.raises(CheckpointError, match=r"is a sam2_hiera_tiny checkpoint, not "
                                              r"sam2.1_hiera_tiny: pass --model sam2_hiera_tiny"):
        load_weights(MODEL, v20)
    with pytest.raises(CheckpointError, match=r"is a tiny checkpoint, not sam2.1_hiera_small"):
        load_weights("sam2.1_hiera_small", tiny_checkpoint)


def test_the_graphs_declare_and_record_sam2_contracts(sam2):
    encoder = onnx.load(str(sam2["encoder"]), load_external_data=False)
    assert [o.name for o in encoder.graph.output] == ["high_res_feats_0", "high_res_feats_1",
                                                       "image_embed"]
    decoder = onnx.load(str(sam2["official"]), load_external_data=False)
    assert [i.name for i in decoder.graph.input] == [
        "image_embed", "high_res_feats_0", "high_res_feats_1", "point_coords", "point_labels",
        "mask_input", "has_mask_input"]  # samexporter's seven, in its order
    record = metadata.read(decoder)
    assert (record["family"], record["model_type"], record["contract"]) == (
        "sam2", MODEL, "sam2_official")


def test_the_batched_decoder_takes_the_maps_in_the_upscalers_block_order():
    """Pixel (4i + 2di + ei, 4j + 2dj + ej) of the stride-4 map is block 8di + 4dj + 2ei + ej
    of token 64i + j; pixel (2i + di, 2j + dj) of the stride-8 map block 2di + dj."""
    rng = np.random.default_rng(0)
    feats_0 = rng.standard_normal((1, 32, 256, 256)).astype(np.float32)
    feats_1 = rng.standard_normal((1, 64, 128, 128)).astype(np.float32)
    blocks_0, blocks_1 = to_blocks(feats_0), to_blocks(feats_1)
    assert blocks_0.shape == (1, 4096, 16, 32) and blocks_1.shape == (1, 4096, 4, 64)
    i, j, c = rng.integers(0, 64, 3)
    for di, dj, ei, ej in np.ndindex(2, 2, 2, 2):
        assert blocks_0[0, 64 * i + j, 8 * di + 4 * dj + 2 * ei + ej, c] == \
            feats_0[0, c, 4 * i + 2 * di + ei, 4 * j + 2 * dj + ej]
        assert blocks_1[0, 64 * i + j, 2 * di + dj, c] == feats_1[0, c, 2 * i + di, 2 * j + dj]
    # a permutation: nothing lost or repeated
    np.testing.assert_array_equal(np.sort(blocks_0, axis=None), np.sort(feats_0, axis=None))
    with pytest.raises(ValueError, match="expected a"):
        to_blocks(feats_0[:, :, :100])


def test_a_pair_whose_encoder_lacks_a_map_is_refused_for_either_decoder(sam2):
    """The batched decoder's block-order maps are made from the encoder's maps: an encoder
    without them cannot feed it either."""
    from sam_onnx.graph.validate import validate_pair

    encoder = onnx.load(str(sam2["encoder"]), load_external_data=False)
    assert validate_pair(encoder, onnx.load(str(sam2["batched"]))).ok
    encoder.graph.output[0].name = "stride4_features"  # another export's high_res_feats_0
    for form, taken in (("official", "high_res_feats_0"),
                        ("batched", "high_res_blocks_0, made from high_res_feats_0")):
        report = validate_pair(encoder, onnx.load(str(sam2[form])))
        (finding,) = report.errors
        assert finding.message == f"decoder takes {taken}, which encoder does not return" \
            and "its own model's encoder" in finding.fix, finding


def _card(folder: Path) -> Path:
    """One small image for check: its three default shapes are tiny's test."""
    path = folder / "card.png"
    Image.fromarray(synthetic(180, 260)).save(path)
    return path


def _assert_checked_against_sam2(report: dict, decoder: str) -> None:
    assert report["passed"] and report["reference"] == "sam2"
    rows = report["rows"]
    passed = {(r["stage"], r["output"]) for r in rows if r["status"] == "pass"}
    assert {("encoder", "high_res_feats_0"), ("encoder", "image_embed")} <= passed
    single = [r for r in rows if r["case"] == "points single-mask"]
    assert bool(single) == (decoder == "batched")  # the official form has no single mask
    (row,) = [r for r in rows if r["stage"] == "automatic masks"]
    assert row["status"] == "pass" and "records" in row["note"]


def test_check_against_sam2s_predictor_and_generator(sam2, tmp_path):
    """The batched decoder on one image (the three default shapes are tiny's test; the
    official decoder is the next test's): sam2's own predictor and generator as the
    reference."""
    proc = run_cli("check", "--model", MODEL, "--checkpoint", sam2["checkpoint"],
                   "--encoder", sam2["encoder"], "--decoder", sam2["batched"], "--format",
                   "json", "--image", _card(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_checked_against_sam2(json.loads(proc.stdout), "batched")


def test_check_exports_with_random_weights_and_passes(tmp_path):
    """The issue's 'done when': check --model sam2.1_hiera_tiny --random-weights --export-to,
    which exports the official decoder and checks it against sam2's predictor and generator."""
    proc = run_cli("check", "--model", MODEL, "--random-weights", "--export-to", tmp_path,
                   "--image", _card(tmp_path), "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_checked_against_sam2(json.loads(proc.stdout), "official")


def test_predictor_mirrors_sam2_image_predictor(sam2, torch_model):
    from sam_onnx.families.sam2.modeling import SamPredictor

    torch_pred = SamPredictor(torch_model)
    onnx_pred = sam_onnx.SamOnnxPredictor(sam2["encoder"], sam2["batched"])
    img = synthetic(240, 360)
    onnx_pred.set_image(img)
    torch_pred.set_image(img)
    calls = [
        dict(point_coords=np.array([[0.4, 0.5], [0.8, 0.2]]), point_labels=np.array([1, 0]),
             normalize_coords=False),
        dict(point_coords=np.array([[150, 120]]), point_labels=np.array([1]),
             box=np.array([40, 30, 250, 200]), multimask_output=False),
        dict(box=np.array([40, 30, 250, 200]), multimask_output=False,
             mask_input=np.full((1, 256, 256), 40.0, np.float32)),
    ]
    for call in calls:
        got = onnx_pred.predict(**call, return_logits=True)
        want = torch_pred.predict(**call, return_logits=True)
        assert got[0].shape == want[0].shape
        np.testing.assert_allclose(got[2], want[2], atol=2e-4)  # clipped to +-32, as SAM 2's
        np.testing.assert_allclose(got[1], want[1], atol=2e-4)
        assert np.mean((got[0] > 0) == (want[0] > 0)) > 0.999
    assert onnx_pred.predict(**calls[2])[2].max() <= 32.0
    official = sam_onnx.SamOnnxPredictor(sam2["encoder"], sam2["official"])
    official.set_image(img)
    with pytest.raises(sam_onnx.SamOnnxError, match="only the three multimask outputs; .* "
                                                    "--decoder-contract batched"):
        official.predict(np.array([[150, 120]]), np.array([1]), multimask_output=False)


@pytest.mark.parametrize("options", [dict(use_m2m=True), dict(multimask_output=False)])
def test_generator_mirrors_sam2s_generator_options(sam2, torch_model, options):
    from sam_onnx.families.sam2.modeling import SamAutomaticMaskGenerator

    img = synthetic(200, 300)
    settings = dict(points_per_side=4, **KEEP_ALL, **options)
    want = SamAutomaticMaskGenerator(torch_model, **settings).generate(img)
    got = sam_onnx.SamOnnxAutomaticMaskGenerator((sam2["encoder"], sam2["batched"]),
                                                 **settings).generate(img)
    parity = compare_records(want, got)
    assert parity.passed and parity.count == len(want) > 0, parity


def test_the_batched_decoder_upscales_only_prompts_that_pass_and_records_stay_sam2s(
        sam2, torch_model):
    """sam2_batched's pred_iou_thresh: scores for every prompt, masks for those with a score
    above it (the same masks as when every prompt's are asked for), none for none; and the
    generator with that threshold gives SAM2AutomaticMaskGenerator's records."""
    from sam_onnx.families.sam2.modeling import SamAutomaticMaskGenerator
    from sam_onnx.runtime.amg import build_point_grid

    img = synthetic(200, 300)
    pred = sam_onnx.SamOnnxPredictor(sam2["encoder"], sam2["batched"])
    pred.set_image(img)
    points = (build_point_grid(4) * [300, 200])[:, None, :]  # the generator's grid
    labels = np.ones((len(points), 1))
    every, scores, kept_every = pred.predict_batch_filtered(points, labels, -np.inf)
    np.testing.assert_array_equal(kept_every, np.arange(len(points)))
    threshold = float(np.median(scores.max(axis=1)))  # about half the prompts pass
    masks, again, kept = pred.predict_batch_filtered(points, labels, threshold)
    np.testing.assert_array_equal(again, scores)
    np.testing.assert_array_equal(kept, np.flatnonzero((scores > threshold).any(axis=1)))
    assert 0 < len(kept) < len(points)
    np.testing.assert_allclose(masks, every[kept], atol=1e-5)
    none, _, kept = pred.predict_batch_filtered(points, labels, float(scores.max()))
    assert none.shape == (0, 3, 256, 256) and len(kept) == 0  # no prompt passes: no masks
    # the graph itself returns the kept prompts' logits only; the multimask outputs read,
    # the single-mask token's threshold is +inf (with random weights it passes everywhere)
    import onnxruntime as ort

    n = len(points)
    low_res, _, kept = ort.InferenceSession(str(sam2["batched"])).run(None, {
        "image_embed": pred.encoded["image_embed"],
        **{f"high_res_blocks_{i}": to_blocks(pred.encoded[f"high_res_feats_{i}"]) for i in (0, 1)},
        "point_coords": (points * [1024 / 300, 1024 / 200]).astype(np.float32),
        "point_labels": labels.astype(np.float32),
        "mask_input": np.zeros((n, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(n, np.float32),
        "pred_iou_thresh": np.array([np.inf, threshold, threshold, threshold], np.float32)})
    np.testing.assert_array_equal(kept, np.flatnonzero((scores > threshold).any(axis=1)))
    assert low_res.shape == (len(kept), 4, 256, 256) and 0 < len(kept) < n

    settings = dict(points_per_side=4, **{**KEEP_ALL, "pred_iou_thresh": threshold})
    want = SamAutomaticMaskGenerator(torch_model, **settings).generate(img)
    got = sam_onnx.SamOnnxAutomaticMaskGenerator(pred, **settings).generate(img)
    parity = compare_records(want, got)
    assert parity.passed and 0 < parity.count == len(want) < 3 * len(points), parity


def test_the_generator_takes_sam2s_defaults(sam2):
    generator = sam_onnx.SamOnnxAutomaticMaskGenerator((sam2["encoder"], sam2["batched"]))
    assert generator.pred_iou_thresh == 0.8  # SAM2AutomaticMaskGenerator's, not SAM's 0.88
    assert generator.predictor.batched


def test_samexporters_own_graphs_are_recognised_and_match_sam2(samexporter, sam2, tmp_path):
    enc, dec = samexporter
    proc = run_cli("validate", enc, dec, "--format", "json")
    assert proc.returncode == 0, proc.stdout
    messages = [f["message"] for f in json.loads(proc.stdout)["findings"]]
    assert "matches the sam2_encoder contract" in messages
    assert "matches the sam2_official contract" in messages
    proc = run_cli("check", "--model", MODEL, "--checkpoint", sam2["checkpoint"], "--encoder",
                   enc, "--decoder", dec, "--image", _card(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # providers falling back to the CPU
        predictor = sam_onnx.SamOnnxPredictor(enc, dec)
    assert not predictor.batched  # traced with one prompt, it fails with more


@pytest.mark.parametrize("decoder, contract", [("decoder", "sam2_ort"),
                                               ("multimask", "sam2_ort_multimask")])
def test_onnxruntimes_own_graphs_are_recognised_and_match_sam2(onnxruntime_graphs, sam2,
                                                               decoder, contract, tmp_path):
    graphs = onnxruntime_graphs
    proc = run_cli("validate", graphs["encoder"], graphs[decoder], "--format", "json")
    assert proc.returncode == 0, proc.stdout
    messages = [f["message"] for f in json.loads(proc.stdout)["findings"]]
    assert "matches the sam2_ort_encoder contract" in messages
    assert f"matches the {contract} contract" in messages
    proc = run_cli("check", "--model", MODEL, "--checkpoint", sam2["checkpoint"], "--encoder",
                   graphs["encoder"], "--decoder", graphs[decoder], "--format", "json",
                   "--image", _card(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = {r["case"] for r in json.loads(proc.stdout)["rows"] if r["status"] == "pass"}
    assert {"points", "box refined"} <= cases  # its input_masks fed as mask_input
    # sam-onnx's own encoder feeds ONNX Runtime's decoder: the names are aliases
    predictor = sam_onnx.SamOnnxPredictor(sam2["encoder"], graphs[decoder])
    predictor.set_image(synthetic(120, 200))
    point, label = np.array([[100, 60]]), np.array([1])
    if contract == "sam2_ort":
        with pytest.raises(sam_onnx.SamOnnxError, match="returns one mask a prompt; pass "
                                                        "multimask_output=False"):
            predictor.predict(point, label)
    masks, _, _ = predictor.predict(point, label, multimask_output=contract != "sam2_ort")
    assert masks.shape[1:] == (120, 200)


def test_export_refuses_the_forms_it_only_recognises(tmp_path):
    with pytest.raises(sam_onnx.SamOnnxError, match="sam2_ort is another tool's form, which "
                                                    "sam-onnx recognises and runs but does not "
                                                    "export; export one of: sam2_official"):
        sam_onnx.export(MODEL, random_weights=True, out_dir=tmp_path, decoder_contract="sam2_ort")
    assert not any(tmp_path.iterdir())


def test_a_sam2_decoder_fed_sams_feed_names_what_is_missing(sam2, tiny_export):
    report = sam_onnx.validate(sam2["official"], feed="official")
    missing = {f.expected for f in report.findings if f.code == "SAM020"}
    assert missing == {"image_embed", "high_res_feats_0", "high_res_feats_1"}
    assert sam_onnx.validate(sam2["official"], feed="sam2_official", run=True).ok
    assert sam_onnx.validate(sam2["batched"], feed="sam2_batched", run=True).ok
    proc = run_cli("validate", sam2["encoder"], tiny_export[0] / "tiny_decoder_official.onnx")
    assert proc.returncode == 1 and "SAM034" in proc.stdout  # another model's decoder
    with pytest.raises(sam_onnx.SamOnnxError, match=r"is sam2.1_hiera_tiny but .* is tiny"):
        sam_onnx.SamOnnxPredictor(sam2["encoder"], tiny_export[0] / "tiny_decoder_official.onnx")


def test_repair_renames_a_sam2_decoders_inputs_back(sam2, tmp_path):
    rename_input(sam2["official"], "high_res_feats_0", "high_res_feat_0",
                 tmp_path / "renamed.onnx")
    assert not sam_onnx.validate(tmp_path / "renamed.onnx", feed="sam2_official").ok
    result = sam_onnx.repair(tmp_path / "renamed.onnx", tmp_path / "fixed.onnx",
                             auto_feed="sam2_official")
    assert result.changes == ["rename: renamed high_res_feat_0 to high_res_feats_0"]
    assert result.parity.passed and result.report.ok


def test_segment_runs_sam2_with_its_options_and_embeddings_keep_the_maps(sam2, tmp_path):
    Image.fromarray(synthetic(200, 300)).save(tmp_path / "card.png")
    proc = run_cli("segment", tmp_path / "card.png", "--encoder", sam2["encoder"], "--decoder",
                   sam2["batched"], "--out", tmp_path / "seg", "--points-per-side", "4",
                   "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--use-m2m",
                   "--single-mask-output", "--providers", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "seg" / "card.json").read_text())["annotations"]
    pred = sam_onnx.SamOnnxPredictor(sam2["encoder"], sam2["official"])
    pred.set_image(synthetic(200, 300))
    first = pred.predict(np.array([[150, 100]]), np.array([1]))[2]
    pred.save_embedding(tmp_path / "emb.npz")
    again = sam_onnx.SamOnnxPredictor(None, sam2["official"])
    again.load_embedding(tmp_path / "emb.npz")
    assert set(again.encoded) == {"image_embed", "high_res_feats_0", "high_res_feats_1"}
    np.testing.assert_array_equal(again.predict(np.array([[150, 100]]), np.array([1]))[2], first)


def test_repair_converts_onnxruntimes_three_mask_decoder_to_samexporters_form(
        onnxruntime_graphs, sam2, tmp_path):
    """ONNX Runtime's --multimask_output decoder -> sam2_official (the form X-AnyLabeling
    loads): validate prints the command, the command converts it, and the result gives the
    original's masks; ONNX Runtime's default one-mask decoder is refused in one line."""
    multimask = onnxruntime_graphs["multimask"]
    report = sam_onnx.validate(multimask, feed="sam2_official")
    assert not report.ok
    (command,) = {re.search(r"sam-onnx repair [^;()]*", f.fix).group(0).strip()
                  for f in report.findings if f.code == "SAM020"}
    args = shlex.split(command)[1:]
    assert args[:3] == ["repair", str(multimask), "-o"] and \
        args[4:] == ["--auto", "--feed", "sam2_official"]
    fixed = Path(args[3])
    proc = run_cli(*args)  # run as printed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matches the sam2_official contract" in sam_onnx.validate(fixed).to_text()
    result = sam_onnx.repair(multimask, tmp_path / "again.onnx", contract="sam2_official")
    assert result.parity.passed  # masks = ONNX Runtime's low-res logits, scores equal
    image, point, label = synthetic(150, 260), np.array([[200, 40]]), np.array([1])
    masks = []
    for decoder in (multimask, fixed):
        predictor = sam_onnx.SamOnnxPredictor(sam2["encoder"], decoder)
        predictor.set_image(image)
        masks.append(predictor.predict(point, label, return_logits=True)[0])
    np.testing.assert_allclose(masks[1], masks[0], atol=1e-4)
    proc = run_cli("repair", onnxruntime_graphs["decoder"], "-o", tmp_path / "one.onnx",
                   "--contract", "sam2_official")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "returns one mask a prompt, sam2_official three" in proc.stderr
    assert not (tmp_path / "one.onnx").exists()
