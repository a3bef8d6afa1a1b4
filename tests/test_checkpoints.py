import hashlib
import http.server
import logging
import threading

import pytest
import torch

from sam_onnx.core.errors import CheckpointError
from sam_onnx.exporter.checkpoints import build, load_state_dict, load_weights, official_checkpoint
from sam_onnx.families import identify
from sam_onnx.families.sam import CHECKPOINT_MD5, MODEL_SPECS
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


def _served(body: bytes, monkeypatch) -> "_Server":
    server = _Server(body, len(body))
    monkeypatch.setenv("SAM_ONNX_CHECKPOINT_URL", server.url)
    return server


def test_download_lands_in_the_cache_under_its_official_name_with_its_checksum(cache,
                                                                                monkeypatch):
    body = b"x" * 3000
    monkeypatch.setitem(CHECKPOINT_MD5, "vit_b", hashlib.md5(body).hexdigest())
    server = _served(body, monkeypatch)
    try:
        path = official_checkpoint("vit_b", progress=False)
    finally:
        server.close()
    assert path == cache / "sam_vit_b_01ec64.pth"
    assert path.read_bytes() == body
    recorded = cache / "sam_vit_b_01ec64.pth.sha256"
    assert recorded.read_text().strip() == hashlib.sha256(body).hexdigest()
    assert sorted(cache.iterdir()) == [path, recorded]


def test_each_sam_checkpoint_name_begins_its_published_md5():
    for model_type, md5 in CHECKPOINT_MD5.items():
        assert MODEL_SPECS[model_type].checkpoint == f"sam_{model_type}_{md5[:6]}.pth"


def test_a_download_without_the_published_md5_is_not_kept(cache, monkeypatch):
    server = _served(b"not the published weights", monkeypatch)
    try:
        with pytest.raises(CheckpointError, match=r"has MD5 \w+, not the published "
                                                  r"01ec64d29a2fca3f0661936605ae66f8; nothing "
                                                  r"was kept"):
            official_checkpoint("vit_b", progress=False)
    finally:
        server.close()
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("model_type", ["vit_b", "sam2.1_hiera_tiny"])
def test_a_damaged_cached_checkpoint_is_replaced(cache, monkeypatch, model_type, caplog):
    """vit_b: checked against its published MD5; SAM 2.1 (none published): against the
    sha256 recorded when it was downloaded."""
    body = b"y" * 5000
    monkeypatch.setitem(CHECKPOINT_MD5, "vit_b", hashlib.md5(body).hexdigest())
    server = _served(body, monkeypatch)
    try:
        path = official_checkpoint(model_type, progress=False)
        path.write_bytes(b"y" * 4000 + b"z" * 1000)  # bits flipped in the cache
        with caplog.at_level(logging.WARNING):
            again = official_checkpoint(model_type, progress=False)
    finally:
        server.close()
    assert again == path and path.read_bytes() == body
    assert "is damaged" in caplog.text and "downloading it again" in caplog.text


def test_a_cached_checkpoint_that_cannot_be_read_is_removed(cache, monkeypatch):
    """A damaged file with no checksum to tell (cached before checksums were recorded)."""
    path = cache / "092824" / "sam2.1_hiera_tiny.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="the cached copy was removed: run the command "
                                              "again to download it"):
        load_weights("sam2.1_hiera_tiny")
    assert not path.exists()


def test_a_part_file_a_killed_download_left_is_removed(cache, monkeypatch):
    cache.mkdir()
    left = cache / ".sam_vit_b_01ec64.pth.999999.part"  # its process is gone: nobody locks it
    left.write_bytes(b"half")
    body = b"x" * 100
    monkeypatch.setitem(CHECKPOINT_MD5, "vit_b", hashlib.md5(body).hexdigest())
    server = _served(body, monkeypatch)
    try:
        official_checkpoint("vit_b", progress=False)
    finally:
        server.close()
    assert not left.exists()


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
