import pytest
import torch
from segment_anything.modeling import image_encoder
from segment_anything.utils.onnx import SamOnnxModel

from sam_onnx.exporter.checkpoints import build
from sam_onnx.families.sam.modeling import chunked_attention, decoder_module


@pytest.mark.parametrize("chunk_elements", [1, 1 << 26])  # one head a chunk; all heads
def test_chunked_attention_matches_segment_anythings_attention(chunk_elements):
    sam = build("tiny", seed=3)
    x = torch.randn(1, 3, 1024, 1024)
    original = image_encoder.Attention.forward
    with torch.inference_mode():
        plain = sam.image_encoder(x)
        with chunked_attention(chunk_elements):
            chunked = sam.image_encoder(x)
    assert image_encoder.Attention.forward is original  # restored
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    assert not torch.equal(plain, torch.zeros_like(plain))


@pytest.mark.parametrize("with_mask", [False, True])
def test_rewritten_decoders_equal_segment_anythings(with_mask):
    """fast_decoder's reassociated arithmetic, behind the official and lowres contracts, gives
    what segment_anything's own SamOnnxModel gives, with and without a mask prompt."""
    sam = build("tiny", seed=5)
    g = torch.Generator().manual_seed(1)
    embeddings = torch.randn(1, 256, 64, 64, generator=g)
    coords = torch.rand(1, 3, 2, generator=g) * 1024
    labels = torch.tensor([[1.0, 0.0, -1.0]])
    mask = torch.randn(1, 1, 256, 256, generator=g) * 4 * with_mask
    has_mask = torch.tensor([float(with_mask)])
    size = torch.tensor([700.0, 500.0])
    with torch.inference_mode():
        masks, scores, low_res = SamOnnxModel(sam, return_single_mask=False)(
            embeddings, coords, labels, mask, has_mask, size)
        official = decoder_module("official", sam)(embeddings, coords, labels, mask, has_mask,
                                                   size)
        lowres = decoder_module("lowres", sam)(embeddings, coords, labels, mask)
    for got, expected in zip(official, (masks, scores, low_res)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for got, expected in zip(lowres, (low_res, scores)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    without = decoder_module("lowres", sam)(embeddings, coords, labels, mask * 0)[0]
    mask_changed_result = (without - lowres[0]).abs().max().item() > 1e-3
    assert mask_changed_result == with_mask
