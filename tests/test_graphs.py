import pytest
import torch

from sam_onnx.checkpoints import build_sam
from sam_onnx.graphs import chunked_attention
from segment_anything.modeling import image_encoder


@pytest.mark.parametrize("chunk_elements", [1, 1 << 26])  # one head a chunk; all heads
def test_chunked_attention_matches_segment_anythings_attention(chunk_elements):
    sam = build_sam("tiny", seed=3)
    x = torch.randn(1, 3, 1024, 1024)
    original = image_encoder.Attention.forward
    with torch.inference_mode():
        plain = sam.image_encoder(x)
        with chunked_attention(chunk_elements):
            chunked = sam.image_encoder(x)
    assert image_encoder.Attention.forward is original  # restored
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    assert not torch.equal(plain, torch.zeros_like(plain))
