"""Sessions: a CUDA request on this CPU-only machine falls back to CPU and says why."""
import json
import os
import subprocess
import sys
import warnings

import pytest
from conftest import run_cli

from sam_onnx.core.errors import SamOnnxError
from sam_onnx.runtime import sessions
from sam_onnx.runtime.sessions import ProviderFallbackWarning, SessionConfig


@pytest.fixture(scope="module")
def decoder(tiny_export):
    return tiny_export[0] / "tiny_decoder_official.onnx"


def test_cuda_requested_cpu_used_reason_reported(decoder):
    sessions._warned.clear()
    with pytest.warns(ProviderFallbackWarning) as caught:
        session = sessions.create(decoder, SessionConfig(providers=("cuda", "cpu")))
    assert session.active == ["CPUExecutionProvider"]
    assert session.requested == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert session.fallback_reason and session.fallback_reason in str(caught[0].message)
    imported = sessions.installed_packages().get("imported")
    if imported == "onnxruntime":
        assert "CPU-only onnxruntime package" in session.fallback_reason
    else:
        assert "libcuda.so.1" in session.fallback_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every session
        sessions.create(decoder, SessionConfig(providers=("cuda", "cpu")))


def test_strict_raises_instead_of_falling_back(decoder):
    with pytest.raises(SamOnnxError, match="requested but .* runs on CPUExecutionProvider"):
        sessions.create(decoder, SessionConfig(providers=("cuda",), strict=True))


def test_cpu_only_request_is_quiet(decoder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session = sessions.create(decoder, SessionConfig(providers=("cpu",)))
    assert session.active == ["CPUExecutionProvider"] and session.fallback_reason is None


def test_unknown_provider_and_optimization_level(decoder):
    with pytest.raises(SamOnnxError, match="unknown provider 'rocm'"):
        sessions.create(decoder, SessionConfig(providers=("rocm",)))
    with pytest.raises(SamOnnxError, match="unknown optimization level"):
        sessions.create(decoder, SessionConfig(providers=("cpu",), optimization="max"))


def test_optimized_model_cache_is_written_once_and_reused(decoder, tmp_path):
    config = SessionConfig(providers=("cpu",), cache_dir=tmp_path)
    sessions.create(decoder, config)
    (cached,) = tmp_path.glob("*.opt.onnx")
    stamp = cached.stat().st_mtime_ns
    second = sessions.create(decoder, config)
    assert cached.stat().st_mtime_ns == stamp and second.input_names[0] == "image_embeddings"


def test_the_optimized_model_appears_only_whole_and_killed_writes_are_cleaned(decoder,
                                                                             tmp_path):
    """Written under a part name and renamed once ONNX Runtime has written it; a part a
    killed start left (nobody holds its lock) is removed by the next start."""
    config = SessionConfig(providers=("cpu",), cache_dir=tmp_path)
    sessions.create(decoder, config)
    (cached,) = tmp_path.glob("*.opt.onnx")
    cached.unlink()
    left = tmp_path / f".{cached.name}.999999.part"
    left.write_bytes(b"half an optimized model")
    sessions.create(decoder, config)
    assert cached.is_file() and not left.exists()
    assert not list(tmp_path.glob(".*.part"))


def test_a_graph_onnx_runtime_cannot_load_is_one_line_naming_validate(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(SamOnnxError, match=r"^ONNX Runtime cannot load .*odd\.onnx: .*NoSuchOp"
                                           r".*; see what is wrong with sam-onnx validate "):
        sessions.create(path, SessionConfig(providers=("cpu",)))


def test_doctor_reports_providers_and_why(tmp_path):
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "CPUExecutionProvider: works" in proc.stdout
    assert "CUDAExecutionProvider: " in proc.stdout and "cores" in proc.stdout


@pytest.mark.heavy
def test_with_onnxruntime_gpu_and_no_driver_the_reason_names_the_driver(decoder, tmp_path):
    """The real onnxruntime-gpu package, shadowing the CPU one, on this driverless machine:
    the fallback said once, in sam-onnx's words only."""
    target = tmp_path / "ortgpu"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                          str(target), "onnxruntime-gpu>=1.20,<2"], capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"onnxruntime-gpu could not be installed here: {pip.stderr[-300:]}")
    code = ("from sam_onnx.runtime import sessions; import warnings; "
            "warnings.simplefilter('ignore');"
            f"s = sessions.create({str(decoder)!r}); print(s.active); print(s.fallback_reason)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert proc.returncode == 0, proc.stderr
    assert "['CPUExecutionProvider']" in proc.stdout
    assert "no NVIDIA driver: libcuda.so.1" in proc.stdout
    # ONNX Runtime is not asked for a provider that cannot load: none of its own error lines
    assert "Failed to load library" not in proc.stderr and not proc.stderr.strip()


def test_openvino_without_its_onnxruntime_build_falls_back_naming_the_package(decoder):
    if sessions.installed_packages().get("imported") == "onnxruntime-openvino":
        pytest.skip("the OpenVINO build is what runs here")
    sessions._warned.clear()
    with pytest.warns(ProviderFallbackWarning) as caught:
        session = sessions.create(decoder, SessionConfig(providers=("openvino", "cpu")))
    assert session.active == ["CPUExecutionProvider"]
    assert "OpenVINOExecutionProvider requested" in str(caught[0].message)
    assert "pip install 'sam-onnx[openvino]'" in session.fallback_reason
    with pytest.raises(SamOnnxError, match="onnxruntime-openvino|own onnxruntime build"):
        sessions.create(decoder, SessionConfig(providers=("openvino",), strict=True))


def test_a_shadowed_openvino_build_is_named(monkeypatch):
    """Both builds installed, the other one imported: the reason says which shadows which."""
    monkeypatch.setattr(sessions, "installed_packages", lambda: {
        "onnxruntime": "1.32.0", "onnxruntime-openvino": "1.24.1", "imported": "onnxruntime"})
    reason = sessions.unavailable_reason(sessions.OPENVINO)
    assert "onnxruntime-openvino is installed but onnxruntime shadows it" in reason
    assert "uninstall every onnxruntime package" in reason


@pytest.mark.heavy
def test_with_onnxruntime_openvino_the_graphs_run_on_openvino(tiny_export, tmp_path):
    """The real onnxruntime-openvino package, shadowing the installed build: OpenVINO runs
    encoder and decoder with the CPU provider's answers, caches its compiled model in its own
    folder, and a CUDA request names the package that lacks it."""
    target = tmp_path / "ortov"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                          str(target), "onnxruntime-openvino>=1.20,<2"],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"onnxruntime-openvino could not be installed here: {pip.stderr[-300:]}")
    code = f"""
import json, warnings, numpy as np
from sam_onnx.graph import feeds as f
from sam_onnx.runtime import sessions
from sam_onnx.families.sam.contracts import DECODER_OFFICIAL
from sam_onnx.runtime.sessions import SessionConfig
folder = {str(tiny_export[0])!r}
rng = np.random.default_rng(0)
feeds = {{"tiny_encoder.onnx": {{"image": rng.standard_normal((1, 3, 1024, 1024), np.float32)}},
         "tiny_decoder_official.onnx": f.example_arrays(DECODER_OFFICIAL)}}
emb = feeds["tiny_decoder_official.onnx"]["image_embeddings"]
emb[...] = rng.standard_normal(emb.shape, np.float32)
out = {{"imported": sessions.installed_packages().get("imported")}}
for graph, feed in feeds.items():
    ov = sessions.create(f"{{folder}}/{{graph}}",
                         SessionConfig(providers=("openvino",), strict=True,
                                       cache_dir={str(tmp_path / "cache")!r}))
    cpu = sessions.create(f"{{folder}}/{{graph}}", SessionConfig(providers=("cpu",)))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ov.run(None, feed), cpu.run(None, feed)))
    out[graph] = {{"active": ov.active, "max_diff": diff}}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out["cuda"] = sessions.create(f"{{folder}}/tiny_decoder_official.onnx").fallback_reason
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["imported"] == "onnxruntime-openvino"
    for graph in ("tiny_encoder.onnx", "tiny_decoder_official.onnx"):
        assert out[graph]["active"][0] == "OpenVINOExecutionProvider", out
        assert out[graph]["max_diff"] < 1e-4, out
    assert list((tmp_path / "cache" / "openvino").iterdir()), "OpenVINO's compiled-model cache"
    assert not list((tmp_path / "cache").glob("*.opt.onnx"))
    assert "onnxruntime-openvino is installed, which has no CUDA" in out["cuda"]


def test_cached_encoder_with_external_data_gives_the_same_output(tiny_export, tmp_path):
    import numpy as np

    encoder = tiny_export[0] / "tiny_encoder.onnx"
    x = {"image": np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype("float32")}
    plain = sessions.create(encoder, SessionConfig(providers=("cpu",))).run(None, x)[0]
    config = SessionConfig(providers=("cpu",), cache_dir=tmp_path)
    sessions.create(encoder, config)
    assert list(tmp_path.glob("*.opt.onnx.data")), "weights of the cached graph stay external"
    cached = sessions.create(encoder, config).run(None, x)[0]
    np.testing.assert_allclose(cached, plain, atol=1e-5)


def test_disabled_optimizers_are_left_out_of_the_optimized_graph(decoder, tmp_path):
    import onnx

    def optimized_ops(disabled):
        folder = tmp_path / ("-".join(disabled) or "default")
        sessions.create(decoder, SessionConfig(providers=("cpu",), cache_dir=folder,
                                               disabled_optimizers=disabled))
        (cached,) = folder.glob("*.opt.onnx")
        return {n.op_type for n in onnx.load(str(cached)).graph.node}

    assert "BiasGelu" in optimized_ops(())
    assert "BiasGelu" not in optimized_ops(("BiasGeluFusion",))
