import http.server
import threading

import pytest
import torch

from sam_onnx.core.errors import CheckpointError
from sam_onnx.exporter.checkpoints import build, load_state_dict, load_weights, official_checkpoint
from sam_onnx.families import identify
from sam_onnx.families.sam import MODEL_SPECS
from sam_onnx.families.sam.modeling import _build


def _shapes_only(model_type):
    """A state_dict with the real shapes but no data (meta tensors): identify reads shapes only."""
    with torch.device("meta"):
        return _build(model_type).state_dict()


@pytest.mark.parametrize("model_type", MODEL_SPECS)
def test_the_tensor_shapes_tell_the_model_type(model_type):
    assert identify(_shapes_only(model_type)) == model_type


def test_a_vit_h_state_dict_refused_as_vit_b_names_what_it_is():
    with pytest.raises(CheckpointError, match=r"the checkpoint is a vit_h checkpoint, "
                                              r"not vit_b: pass --model vit_h"):
        build("vit_b", _shapes_only("vit_h"))


def test_a_mismatched_checkpoint_file_is_refused(tiny_checkpoint):
    with pytest.raises(CheckpointError,
                       match=r"is a tiny checkpoint, not vit_b: pass --model tiny"):
        load_weights("vit_b", tiny_checkpoint)


def test_checkpoint_loads_through_weights_only_and_matches_the_saved_model(tiny_checkpoint):
    weights = load_weights("tiny", tiny_checkpoint)
    saved = torch.load(tiny_checkpoint, weights_only=True)
    for name, tensor in weights.sam.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert weights.checksum.startswith("sha256:") and len(weights.checksum) == 71
    assert not weights.random


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_state_dict(tmp_path / "nope.pth")


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
def test_damaged_checkpoints_are_refused(tmp_path, tiny_checkpoint, damage):
    data = tiny_checkpoint.read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes({"truncated": data[: len(data) // 2],
                     "random bytes": bytes(range(256)) * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="empty|truncated or corrupt|cannot read"):
        load_state_dict(bad)


def test_a_non_sam_state_dict_is_named(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match=r"not a SAM checkpoint .*conv1\.weight"):
        identify(load_state_dict(path), path)


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="runs no pickled code"):
        load_state_dict(path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_a_wrapped_state_dict_is_unwrapped(tmp_path, tiny_checkpoint):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": torch.load(tiny_checkpoint, weights_only=True), "epoch": 3}, path)
    assert identify(load_state_dict(path)) == "tiny"


class _Server:
    """A loopback HTTP server standing in for dl.fbaipublicfiles.com."""

    def __init__(self, body: bytes, declared_length: int):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(declared_length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_ONNX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_lands_in_the_cache_under_its_official_name(cache, monkeypatch):
    server = _Server(b"x" * 3000, 3000)
    monkeypatch.setenv("SAM_ONNX_CHECKPOINT_URL", server.url)
    try:
        path = official_checkpoint("vit_b", progress=False)
    finally:
        server.close()
    assert path == cache / "sam_vit_b_01ec64.pth"
    assert path.read_bytes() == b"x" * 3000
    assert list(cache.iterdir()) == [path]


def test_an_interrupted_download_leaves_no_file(cache, monkeypatch):
    server = _Server(b"x" * 1000, 5000)  # connection closes early
    monkeypatch.setenv("SAM_ONNX_CHECKPOINT_URL", server.url)
    try:
        with pytest.raises(CheckpointError, match="could not download"):
            official_checkpoint("vit_b", progress=False)
    finally:
        server.close()
    assert list(cache.iterdir()) == []


def test_offline_download_says_to_pass_a_checkpoint_or_random_weights(cache, monkeypatch):
    monkeypatch.setenv("SAM_ONNX_CHECKPOINT_URL", "http://127.0.0.1:9/")  # nothing listens
    with pytest.raises(CheckpointError, match=r"--checkpoint PATH .* --random-weights"):
        load_weights("vit_l")
    assert not any(cache.iterdir())
