"""`pip install sam-onnx[cpu]` in a fresh virtual environment: no torch, and predict, segment,
validate, repair and doctor work; the commands that need PyTorch name the extra to install."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sam_onnx.runtime.images import synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_venv(tmp_path_factory):
    """A venv with sam-onnx[cpu] installed from a copy of this checkout's sources."""
    root = tmp_path_factory.mktemp("venv")
    src = root / "src"
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "sam_onnx", src / "sam_onnx",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", root / "venv"], check=True, timeout=120)
    bin_dir = root / "venv" / "bin"
    proc = subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", f"{src}[cpu]"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return bin_dir


def _run(bin_dir: Path, *args, cwd=None):
    return subprocess.run([bin_dir / "sam-onnx", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_the_cpu_extra_installs_no_pytorch(cpu_venv):
    proc = subprocess.run([cpu_venv / "python", "-c", "import torch"], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    listed = subprocess.run([cpu_venv / "python", "-m", "pip", "list"], capture_output=True,
                            text=True).stdout.lower()
    for heavy in ("torch", "torchvision", "segment-anything", "onnxscript"):
        assert f"\n{heavy} " not in listed


def test_predict_segment_validate_repair_and_doctor_run_without_pytorch(cpu_venv, tiny_export,
                                                                        tiny_batched, tmp_path):
    out, _ = tiny_export
    encoder, decoder = out / "tiny_encoder.onnx", out / "tiny_decoder_official.onnx"
    image = tmp_path / "card.png"
    Image.fromarray(synthetic(180, 240)).save(image)

    proc = _run(cpu_venv, "predict", image, "--encoder", encoder, "--decoder", decoder,
                "--point", "120,90", "--out", tmp_path / "mask.png", "--providers", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "mask.png").size == (240, 180)

    proc = _run(cpu_venv, "segment", image, "--encoder", encoder, "--decoder", tiny_batched,
                "--out", tmp_path / "seg", "--points-per-side", "4", "--providers", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "seg" / "card.json").is_file()

    proc = _run(cpu_venv, "validate", encoder, decoder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SAM035" in proc.stdout  # the pair fits
    proc = _run(cpu_venv, "validate", decoder, "--feed", "official", "--run")
    assert proc.returncode == 0 and "SAM030" in proc.stdout, proc.stdout + proc.stderr

    proc = _run(cpu_venv, "repair", decoder, "-o", tmp_path / "lowres.onnx", "--contract",
                "lowres")
    assert proc.returncode == 0, proc.stderr
    assert "parity" in proc.stdout and (tmp_path / "lowres.onnx").is_file()

    proc = _run(cpu_venv, "doctor")
    assert proc.returncode == 0 and "CPUExecutionProvider" in proc.stdout


@pytest.mark.parametrize("command", [
    ["export", "--model", "tiny", "--random-weights", "--out", "x"],
    ["check", "--model", "tiny", "--random-weights", "--export-to", "x"],
    ["bench", "--model", "tiny", "--random-weights", "--export-to", "x"],
])
def test_commands_that_need_pytorch_name_the_extra(cpu_venv, tmp_path, command):
    proc = _run(cpu_venv, *command, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: this needs PyTorch and the sam model code (torch, segment-anything not "
        "installed); pip install 'sam-onnx[export]'"]
    assert not (tmp_path / "x").exists()
