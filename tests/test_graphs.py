import torch

from sam_onnx.checkpoints import build_sam
from sam_onnx.graphs import chunked_attention
from segment_anything.modeling import image_encoder


def test_chunked_attention_matches_segment_anythings_attention(monkeypatch):
    sam = build_sam("tiny", seed=3)
    x = torch.randn(1, 3, 1024, 1024)
    monkeypatch.setattr("sam_onnx.graphs.ATTENTION_CHUNK_ELEMENTS", 1 << 23)  # 1 head a chunk
    with torch.inference_mode():
        plain = sam.image_encoder(x)
        with chunked_attention():
            chunked = sam.image_encoder(x)
    assert image_encoder.Attention.forward.__name__ == "forward"  # restored
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    assert not torch.equal(plain, torch.zeros_like(plain))
