import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam_onnx.exporter.checkpoints import build


def run_cli(*args, env=None, timeout=900, module="sam_onnx.cli"):
    """Run the real `sam-onnx` entry point (or another tool's ``module``) in a fresh process
    (exit codes, stderr, tracebacks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def rename_input(src: Path, old: str, new: str, dst: Path) -> Path:
    """A copy of the graph at ``src`` whose input ``old`` is called ``new`` (another
    exporter's name for it), saved at ``dst``."""
    import onnx

    model = onnx.load(str(src))
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    onnx.save(model, str(dst))
    return dst


def save_random_weights(registry, name: str, path: Path, seed: int) -> Path:
    """Seeded random weights from a package's own builder registry, saved as a checkpoint."""
    torch.manual_seed(seed)
    torch.save(registry[name](checkpoint=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Random weights of the tiny SAM, saved as a real checkpoint file."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(build("tiny", seed=1).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_checkpoint):
    """One CLI export of the tiny model from its checkpoint, shared by read-only tests."""
    out = tmp_path_factory.mktemp("exported")
    proc = run_cli("export", "--model", "tiny", "--checkpoint", tiny_checkpoint, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def static_points(size, names=("point_coords", "point_labels")):
    """A graph mutation: fix the point axis of ``names`` at ``size``, as old exports did."""
    def change(model):
        for value in model.graph.input:
            if value.name in names:
                value.type.tensor_type.shape.dim[1].dim_value = size
    return change


@pytest.fixture(scope="session")
def tiny_batched(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny model's batched decoder, exported (and checked) through the library."""
    import sam_onnx

    out = tmp_path_factory.mktemp("batched")
    sam_onnx.export("tiny", checkpoint=tiny_checkpoint, out_dir=out, encoder=False,
                    decoder_contract="batched", isolate=False)
    return out / "tiny_decoder_batched.onnx"


@pytest.fixture(scope="session")
def samexporter_code(tmp_path_factory) -> Path:
    """samexporter 0.5.0's code, from its wheel (its pins, torch 2.10 among them, keep it out
    of our environment; the code is pure Python): a folder to put on PYTHONPATH."""
    import zipfile

    tmp = tmp_path_factory.mktemp("samexporter")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                          str(tmp), "samexporter==0.5.0"], capture_output=True, text=True,
                         timeout=300)
    if got.returncode != 0:
        pytest.skip(f"samexporter's wheel is not reachable: {got.stderr.strip()[-200:]}")
    (wheel,) = tmp.glob("*.whl")
    zipfile.ZipFile(wheel).extractall(tmp / "code")
    return tmp / "code"
