"""`sam-onnx check` and `sam-onnx bench` end to end: on the tiny model, on vit_b random weights
(heavy), with a deliberately broken decoder, a CUDA request on a CPU-only machine, bad input."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli
from onnx import numpy_helper
from PIL import Image

from sam_onnx.exporter.run import read_manifest
from sam_onnx.graph import metadata


@pytest.fixture(scope="module")
def graphs(tiny_export, tiny_checkpoint, tiny_batched):
    out, _ = tiny_export
    return {"encoder": out / "tiny_encoder.onnx", "official": out / "tiny_decoder_official.onnx",
            "batched": tiny_batched, "checkpoint": tiny_checkpoint}


def _broken_decoder(src: Path, dst: Path) -> Path:
    """The official decoder with its IoU head's last bias shifted: scores go wrong, masks not."""
    model = onnx.load(str(src))
    target = next(i for i in model.graph.initializer
                  if "iou_prediction_head" in i.name and i.name.endswith("bias")
                  and len(i.dims) == 1 and i.dims[0] == 4)
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) + 0.5, target.name))
    onnx.save(model, str(dst))
    return dst


def test_check_passes_on_the_exported_graphs(graphs, tmp_path):
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 260, 3), np.uint8)).save(image)
    proc = run_cli("check", "--model", "tiny", "--checkpoint", graphs["checkpoint"], "--encoder",
                   graphs["encoder"], "--decoder", graphs["official"], "--format", "json",
                   "--providers", "cuda,cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["decoder_contract"] == "official"
    assert report["providers"] == ["CPUExecutionProvider"]  # CUDA asked for, CPU reported
    assert "CUDAExecutionProvider requested but" in proc.stderr
    stages = {(r["stage"], r["output"]) for r in report["rows"]}
    assert {("encoder", "image_embeddings"), ("decoder", "low_res_masks"),
            ("decoder", "iou_predictions"), ("decoder", "masks")} <= stages
    cases = {r["case"] for r in report["rows"]}
    assert {"points", "box", "points+box", "points refined"} <= cases
    assert len({r["image"] for r in report["rows"]}) == 3  # three shapes by default
    # what it is doing, as it goes (it used to print nothing for minutes)
    assert re.search(r"check: image 1 of 3 \(.*\): encoder, then each prompt kind, ONNX "
                     r"Runtime vs segment_anything", proc.stderr), proc.stderr
    assert "check: image 3 of 3" in proc.stderr
    proc = run_cli("check", "--model", "tiny", "--checkpoint", graphs["checkpoint"], "--encoder",
                   graphs["encoder"], "--decoder", graphs["batched"], "--image", image,
                   "--format", "markdown")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| stage | image |" in proc.stdout and "**PASS" in proc.stdout
    assert "automatic masks" in proc.stdout and "takes no mask_input" in proc.stdout


def test_check_fails_a_broken_decoder_and_names_the_output(graphs, tmp_path):
    broken = _broken_decoder(graphs["official"], tmp_path / "broken.onnx")
    proc = run_cli("check", "--model", "tiny", "--checkpoint", graphs["checkpoint"], "--encoder",
                   graphs["encoder"], "--decoder", broken)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL") and "iou_predictions" in last
    assert "Traceback" not in proc.stderr


def test_check_exports_then_holds_int8_to_its_gate(graphs, tmp_path):
    proc = run_cli("check", "--model", "tiny", "--checkpoint", graphs["checkpoint"],
                   "--export-to", tmp_path / "out", "--precision", "int8", "--format", "json")
    report = json.loads(proc.stdout)
    assert report["precision"] == "int8" and report["encoder"].endswith(".int8.onnx")
    assert proc.returncode == (0 if report["passed"] else 1)
    masks = [r for r in report["rows"] if r["output"] == "masks"]
    assert masks and all(r["limit"] == 0.95 for r in masks)
    assert all((r["status"] == "pass") == (r["value"] >= 0.95) for r in masks)


@pytest.mark.parametrize("args, code, words", [
    (["--model", "tiny", "--random-weights"], 2, "--encoder and --decoder"),
    (["--model", "tiny", "--random-weights", "--encoder", "{encoder}", "--decoder",
      "{official}"], 1, "was exported from weights"),
    (["--model", "tiny", "--checkpoint", "{checkpoint}", "--encoder", "{encoder}",
      "--decoder", "{official}", "--image", "missing.png"], 1, "missing.png"),
    (["--model", "tiny", "--checkpoint", "{checkpoint}", "--encoder", "{encoder}",
      "--decoder", "{official}", "--precision", "fp8"], 2, "fp8"),
])
def test_check_bad_arguments(graphs, args, code, words):
    proc = run_cli("check", *[a.format(**graphs) for a in args])
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_bench_reports_pytorch_and_onnx_and_never_calls_cpu_cuda(graphs, tmp_path):
    md, js, png = tmp_path / "bench.md", tmp_path / "bench.json", tmp_path / "bench.png"
    proc = run_cli("bench", "--model", "tiny", "--checkpoint", graphs["checkpoint"], "--encoder",
                   graphs["encoder"], "--decoder", graphs["batched"], "--size", "200x300",
                   "--repeat", "2", "--points-per-side", "3", "--providers", "cuda,cpu",
                   "--out", md, "--json", js, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    width, height = Image.open(png).size
    assert width > 400 and height > 200
    report = json.loads(js.read_text())
    assert set(report["pipelines"]) == {"PyTorch", "ONNX cpu"}
    assert "ONNX cuda" in report["skipped"] and report["skipped"]["ONNX cuda"]
    cpu = report["pipelines"]["ONNX cpu"]
    assert cpu["providers"]["encoder"] == ["CPUExecutionProvider"]
    for pipeline in report["pipelines"].values():
        assert pipeline["encoder_s"]["runs"] == 2 and pipeline["encoder_s"]["median"] > 0
        assert pipeline["prompt_ms"]["median"] > 0 and pipeline["peak_rss_gib"] > 0.1
        assert pipeline["automatic_masks"] >= 0
    env = report["environment"]
    assert env["gemm_gflops"] > 1 and env["encoder_tflop"] > 0 and env["threads"]["torch"] >= 1
    assert env["versions"]["onnxruntime"] and env["cpu"]
    table = md.read_text()
    assert "| metric | PyTorch | ONNX cpu | ratio |" in table
    assert "ONNX cuda: not run" in table and "encoder, % of fp32 GEMM floor" in table


def test_bench_runs_the_peers_their_way_in_turns(graphs, samexporter_code, tmp_path):
    """--peers: segment-anything's export script's graph run as its notebook runs it, and
    samexporter's graphs run by its SegmentAnythingONNX, made by their own code, in turns with
    PyTorch and sam-onnx; each pipeline's masks against PyTorch's at both orientations."""
    js = tmp_path / "bench.json"
    encoder = tmp_path / "graphs" / "tiny_encoder.onnx"
    encoder.parent.mkdir()
    for source in Path(graphs["encoder"]).parent.glob("tiny_encoder.onnx*"):  # and its .data
        shutil.copy(source, encoder.parent / source.name)
    proc = run_cli("bench", "--model", "tiny", "--checkpoint", graphs["checkpoint"], "--encoder",
                   encoder, "--decoder", graphs["batched"], "--size", "200x300", "--repeat",
                   "1", "--no-automatic", "--providers", "cpu", "--peers",
                   "official,samexporter", "--rounds", "2", "--json", js,
                   env={"PYTHONPATH": str(samexporter_code)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(js.read_text())
    pipelines = report["pipelines"]
    assert set(pipelines) == {"PyTorch", "ONNX cpu", "official", "samexporter"}
    assert sorted(p.name for p in (encoder.parent / "peers").iterdir()) == \
        ["official", "samexporter"]
    for metrics in pipelines.values():  # two rounds of one timed run, a start-up a round
        assert metrics["encoder_s"]["runs"] == 2 and metrics["init_s"]["runs"] == 2
        assert metrics["gemm_gflops"] > 1 and metrics["encoder_floor_pct"] > 0
    assert pipelines["ONNX cpu"]["mask_iou_image"] > 0.99
    assert pipelines["ONNX cpu"]["mask_iou_rotated"] > 0.99
    assert pipelines["samexporter"]["mask_iou_rotated"] > 0.98  # it upscales itself
    # segment-anything's script freezes the crop at its dummy 1500x2250 (landscape, 2:3): right
    # on this 200x300 image, wrong turned (measured: IoU 0.23)
    assert pipelines["official"]["mask_iou_image"] > 0.99
    assert pipelines["official"]["mask_iou_rotated"] < 0.9


def test_bench_says_a_peer_that_is_not_installed_and_refuses_an_unknown_one(graphs, tmp_path):
    js = tmp_path / "bench.json"
    args = ("bench", "--model", "tiny", "--checkpoint", graphs["checkpoint"], "--encoder",
            graphs["encoder"], "--decoder", graphs["batched"], "--size", "64x64", "--repeat",
            "1", "--no-automatic", "--providers", "cpu")
    proc = run_cli(*args, "--peers", "samexporter", "--json", js)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(js.read_text())
    assert "samexporter" not in report["pipelines"]
    assert report["skipped"]["samexporter"] == \
        "not installed (pip install --no-deps samexporter==0.5.0)"
    proc = run_cli(*args, "--peers", "official,nope")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown peer 'nope'; use one or more of: official, samexporter" in proc.stderr


@pytest.mark.parametrize("args, code, words", [
    (["--model", "tiny", "--random-weights"], 2, "--encoder and --decoder"),
    (["--model", "tiny", "--checkpoint", "{checkpoint}", "--encoder", "{encoder}",
      "--decoder", "{batched}", "--size", "big"], 2, "--size"),
    (["--model", "tiny", "--checkpoint", "{checkpoint}", "--encoder", "{encoder}",
      "--decoder", "nope.onnx"], 1, "nope.onnx does not exist"),
])
def test_bench_bad_arguments(graphs, args, code, words):
    proc = run_cli("bench", *[a.format(**graphs) for a in args])
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.heavy
def test_check_on_vit_b_random_weights(tmp_path):
    """check at full size; its --export-to runs the exporter's own checks too. (bench and the
    automatic-mask row are the same code at every size: tiny's tests run them; skipping the
    row here saves 60 s, PyTorch's generator encoding the image again.)"""
    image = tmp_path / "card.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (240, 320, 3), np.uint8)).save(image)
    out = tmp_path / "vit_b"
    proc = run_cli("check", "--model", "vit_b", "--random-weights", "--export-to", out,
                   "--decoder-contract", "batched", "--image", image, "--no-automatic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS")
    assert "automatic masks" not in proc.stdout and "points single-mask" in proc.stdout
    # the export's own checks at full size, as its manifest records them
    graphs = {g["role"]: g for g in read_manifest(out / "vit_b_manifest.json")["graphs"]}
    assert graphs["encoder"]["parity"]["passed"] and graphs["decoder"]["parity"]["passed"]
    assert {r["feed"] for r in graphs["decoder"]["parity"]["rows"]} == {
        "points+mask@534x800", "box+point@1200x1800"}
    encoder = onnx.load(str(out / "vit_b_encoder.onnx"), load_external_data=False)
    assert metadata.read(encoder)["model_type"] == "vit_b"
    shutil.rmtree(out)


def test_check_reads_the_contract_of_a_graph_without_sam_onnx_metadata(graphs, tmp_path):
    """As a decoder from segment-anything's own export script: no sam_onnx.* metadata."""
    model = onnx.load(str(graphs["official"]))
    del model.metadata_props[:]
    plain = tmp_path / "sam_onnx_example.onnx"
    onnx.save(model, str(plain))
    proc = run_cli("check", "--model", "tiny", "--checkpoint", graphs["checkpoint"], "--encoder",
                   graphs["encoder"], "--decoder", plain, "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["decoder_contract"] == "official"


def test_the_parity_gate_holds_masks_to_their_overlap():
    from sam_onnx.core.parity import compare
    from sam_onnx.families.sam.contracts import DECODER_OFFICIAL

    tol = DECODER_OFFICIAL.tolerances["int8"]
    ref = {"low_res_masks": np.linspace(-1, 1, 1000).reshape(1, 1, 10, 100)}
    shifted = {"low_res_masks": ref["low_res_masks"] + 0.2}  # within rtol 0.25, masks move
    (row,) = compare("feed", shifted, ref, tol)
    assert row.max_abs_err <= row.allowed and row.mask_iou < tol.min_mask_iou
    assert not row.passed and "IoU" in row.describe()
