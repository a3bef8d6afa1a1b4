import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli

import sam_onnx
from sam_onnx.core.errors import ParityError, SamOnnxError
from sam_onnx.exporter import run as exporter
from sam_onnx.exporter.checkpoints import build
from sam_onnx.families.sam import modeling as graphs
from sam_onnx.families.sam import reference
from sam_onnx.families.sam.contracts import DECODER_LOWRES, DECODER_OFFICIAL, ENCODER
from sam_onnx.graph import metadata
from sam_onnx.graph.signature import mismatches


def _final_files(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_cli_export_writes_checked_graphs_and_a_manifest(tiny_export, tiny_checkpoint):
    out, proc = tiny_export
    assert _final_files(out) == ["tiny_decoder_official.onnx", "tiny_encoder.onnx",
                                 "tiny_encoder.onnx.data", "tiny_manifest.json"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging folder left behind"
    manifest = json.loads((out / "tiny_manifest.json").read_text())
    [export] = manifest["exports"]
    assert export["random_weights"] is False
    assert [g["contract"] for g in manifest["graphs"]] == ["encoder", "official"]
    assert all(g["parity"]["passed"] and g["export"] == export["id"] for g in manifest["graphs"])
    assert "export encoder (encoder)" in export["timings_s"]
    assert "parity tiny_encoder.onnx" in proc.stderr and "ok" in proc.stdout


def test_graphs_record_contract_and_provenance(tiny_export, tiny_checkpoint):
    out, _ = tiny_export
    for name, contract in (("tiny_encoder.onnx", ENCODER),
                           ("tiny_decoder_official.onnx", DECODER_OFFICIAL)):
        model = onnx.load(str(out / name), load_external_data=False)
        meta = metadata.read(model)
        assert meta["role"] == contract.role and meta["model_type"] == "tiny"
        assert metadata.recorded_contract(model) == contract
        assert meta["preprocess"]["pixel_mean"] == [123.675, 116.28, 103.53]
        assert meta["weights_source"] == str(tiny_checkpoint)
        assert meta["weights"].startswith("sha256:") and meta["random_weights"] is False
        assert meta["opset"] == 18 and "torch" in meta["versions"]
        assert mismatches(model, contract) == []


def test_decoder_masks_are_right_for_an_image_size_not_used_while_exporting(tiny_export,
                                                                             tiny_checkpoint):
    out, _ = tiny_export
    sam = build("tiny", sam_onnx.exporter.checkpoints.load_state_dict(tiny_checkpoint))
    session = ort.InferenceSession(str(out / "tiny_decoder_official.onnx"),
                                   providers=["CPUExecutionProvider"])
    emb = {"image_embeddings": reference.random_embeddings(seed=5)}
    for size in ((100, 3000), (2048, 333)):
        prompt = reference.Prompt("odd", size, np.array([[50.0, 40.0]]), np.array([1.0]))
        feed = reference.decoder_feed(DECODER_OFFICIAL, emb, prompt)
        ref = reference.decoder_reference(sam, DECODER_OFFICIAL, emb, prompt)
        masks = session.run(["masks"], feed)[0]
        assert masks.shape == (1, 4, *size)
        np.testing.assert_allclose(masks, ref["masks"], atol=1e-4)


def test_lowres_export_and_random_weights_are_marked(tmp_path):
    result = sam_onnx.export("tiny", random_weights=True, out_dir=tmp_path,
                             decoder_contract="lowres", encoder=False, simplify=True)
    graph = result.graph("decoder")
    assert graph.path == tmp_path / "tiny_decoder_lowres.onnx" and graph.parity.passed
    model = onnx.load(str(graph.path))
    assert mismatches(model, DECODER_LOWRES) == []
    assert metadata.read(model)["random_weights"] is True
    assert metadata.read(model)["weights"] == "random"
    assert result.random_weights


def test_int8_graphs_are_checked_with_their_own_tolerance(tmp_path):
    result = sam_onnx.export("tiny", random_weights=True, out_dir=tmp_path, quantize="int8")
    for role in ("encoder", "decoder"):
        q = result.graph(role, "int8")
        assert q.parity.passed and q.parity.tolerance == q.contract.tolerances["int8"]
        record = metadata.read(onnx.load(str(q.path), load_external_data=False))
        assert record["precision"] == "int8"
        if role == "decoder":  # tiny's encoder layers are 64 wide: a column's scale and zero
            # point weigh more there than its weights save (vit_b's: 129 MB of 384)
            assert q.path.stat().st_size < result.graph(role).path.stat().st_size
        model = onnx.load(str(q.path))
        ops = {n.op_type for n in model.graph.node}
        assert "MatMulInteger" in ops and "ConvInteger" not in ops  # convolutions stay fp32
        # weights in 7 bits: 8-bit ones saturate ONNX Runtime's products on AVX2 CPUs
        weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")]
        assert weights and max(int(abs(w.astype(int)).max()) for w in weights) <= 64
        # encoders: a scale per output column (TinyViT's error halved); decoders: one a weight
        scales = {t.name[:-len("_scale")]: list(t.dims) for t in model.graph.initializer
                  if t.name.endswith("_scale")}
        columns = [(scales[t.name[:-len("_quantized")]], t.dims[-1])
                   for t in model.graph.initializer if t.name.endswith("_quantized")]
        assert columns and all(dims == ([n] if role == "encoder" else [])
                               for dims, n in columns), columns


def test_unknown_model_type_is_a_usage_error():
    proc = run_cli("export", "--model", "vit_x", "--random-weights")
    assert proc.returncode == 2 and "vit_x" in proc.stderr and "Traceback" not in proc.stderr


def test_offline_without_checkpoint_fails_in_one_line(tmp_path):
    proc = run_cli("export", "--model", "vit_b", "--out", tmp_path / "o",
                   env={"SAM_ONNX_CACHE": str(tmp_path / "c"),
                        "SAM_ONNX_CHECKPOINT_URL": "http://127.0.0.1:9/"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--checkpoint PATH" in proc.stderr and "--random-weights" in proc.stderr
    assert not (tmp_path / "o").exists() or _final_files(tmp_path / "o") == []


@pytest.mark.parametrize("kind", ["missing", "corrupt", "mismatched"])
def test_bad_checkpoints_fail_before_any_graph_is_written(tmp_path, tiny_checkpoint, kind):
    ckpt = {"missing": tmp_path / "none.pth", "corrupt": tmp_path / "bad.pth",
            "mismatched": tiny_checkpoint}[kind]
    if kind == "corrupt":
        ckpt.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    model = "vit_b" if kind == "mismatched" else "tiny"
    proc = run_cli("export", "--model", model, "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0]
    assert {"missing": "not found", "corrupt": "corrupt",
            "mismatched": "pass --model tiny"}[kind] in proc.stderr
    assert _final_files(tmp_path / "o") == []


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_cli("export", "--model", "tiny", "--random-weights", "--out", blocker / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot write to output folder" in proc.stderr and "--out" in proc.stderr


def test_a_failed_check_keeps_what_existed_and_writes_nothing(tmp_path, monkeypatch):
    sam_onnx.export("tiny", random_weights=True, out_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = graphs.decoder_module

    def halves_mask_prompt(contract_name, sam):
        module = real(contract_name, sam)
        embed = module._embed_masks
        module._embed_masks = lambda mask, has_mask: embed(mask * 0.5, has_mask)
        return module

    monkeypatch.setattr(graphs, "decoder_module", halves_mask_prompt)
    with pytest.raises(ParityError, match=r"tiny_decoder_official.onnx disagrees with PyTorch "
                                          r"on \w+ for 'points\+mask"):
        sam_onnx.export("tiny", random_weights=True, out_dir=tmp_path, isolate=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_interrupted_export_leaves_no_final_file(tmp_path, monkeypatch):
    run_half = exporter._run

    def interrupt_the_checks(half, *args):  # Ctrl-C once the graphs are staged
        if half is exporter._check_half:
            raise KeyboardInterrupt
        return run_half(half, *args)

    monkeypatch.setattr(exporter, "_run", interrupt_the_checks)
    with pytest.raises(KeyboardInterrupt):
        sam_onnx.export("tiny", random_weights=True, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_export_process_leaves_no_final_file(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sam_onnx.cli", "export", "--model", "tiny",
                             "--random-weights", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(p.suffix == ".onnx" for s in tmp_path.glob(".sam-onnx-staging-*")
                  for p in s.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "export never staged a graph"
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert workers, "the export should run its PyTorch half in a worker process"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _final_files(tmp_path) == []
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{pid}") and not _is_zombie(pid) for pid in workers):
        assert time.time() < deadline, "the worker outlived the killed export"
        time.sleep(0.1)


def _children(pid):
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def _is_zombie(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _killed_by_the_system():
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer does


def test_a_half_killed_for_memory_is_reported_in_one_line():
    with pytest.raises(SamOnnxError, match=r"^the ONNX Runtime check process died \(out of "
                                           r"memory\?\); nothing was written\. Free memory"):
        exporter._run(_killed_by_the_system, (), True, "ONNX Runtime check")


def test_nothing_to_export_is_refused():
    with pytest.raises(SamOnnxError, match="nothing to export"):
        sam_onnx.export("tiny", random_weights=True, encoder=False, decoder=False)


def test_import_without_onnxruntime_names_the_extra(tmp_path):
    blocker = tmp_path / "onnxruntime.py"
    blocker.write_text("raise ImportError('No module named onnxruntime')\n")
    proc = subprocess.run([sys.executable, "-c", "import sam_onnx"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1
    assert "pip install 'sam-onnx[cpu]'" in proc.stderr and "sam-onnx[gpu]" in proc.stderr


def test_the_checking_process_never_imports_torch():
    code = ("import sys, sam_onnx, sam_onnx.exporter, sam_onnx.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_check_half_runs_with_torch_unimportable(tmp_path):
    from sam_onnx.exporter.torch_half import Job, run

    staged = run(Job("tiny", None, True, ("encoder", "official"), tmp_path, 18, False, False))
    (tmp_path / "staged.pkl").write_bytes(pickle.dumps(staged))
    code = f"""
import pickle, sys
for name in ("torch", "torchvision", "segment_anything"):
    sys.modules[name] = None  # any import of these now raises ImportError
from sam_onnx.exporter import run as exporter
staged = pickle.loads(open({str(tmp_path / "staged.pkl")!r}, "rb").read())
graphs, _ = exporter._check_half(staged, None)
print(" ".join(g.path.name for g in graphs if g.parity.passed))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tiny_encoder.onnx", "tiny_decoder_official.onnx"]


def test_opset_is_what_the_graphs_carry(tmp_path):
    result = sam_onnx.export("tiny", random_weights=True, out_dir=tmp_path, opset=20,
                             isolate=False)
    for g in result.graphs:
        model = onnx.load(str(g.path), load_external_data=False)
        assert [o.version for o in model.opset_import if o.domain == ""] == [20]
        assert metadata.read(model)["opset"] == 20
    proc = run_cli("export", "--model", "tiny", "--random-weights", "--opset", "17")
    assert proc.returncode == 2 and "18<=x<=20" in proc.stderr
