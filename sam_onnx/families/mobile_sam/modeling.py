"""MobileSAM's PyTorch side: mobile_sam's builder and reference predictors; the decoder
wrappers are SAM's (``families.sam.modeling``: the same prompt encoder and mask decoder), the
encoder is mobile_sam's TinyViT as it is.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Mapping, Optional

import torch

with warnings.catch_warnings():  # timm's deprecation and registry chatter on import
    warnings.simplefilter("ignore")
    from mobile_sam import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

from ..base import load_strict
from ..sam import reference
from ..sam.modeling import decoder_module, predictor_encoded

__all__ = ["build", "encoder_module", "decoder_module", "reference_context", "export_context",
           "reference", "SamPredictor", "SamAutomaticMaskGenerator", "predictor_encoded"]


def build(model_type: str, state: Optional[Mapping] = None, seed: int = 0):
    """MobileSAM through mobile_sam's builder; seeded random weights when ``state`` is None.

    Built on the CPU, not the meta device as SAM is: TinyViT keeps buffers outside its
    state_dict (attention bias indices) that must be real; the model is ~10 M parameters."""
    torch.manual_seed(seed)
    sam = sam_model_registry[model_type](checkpoint=None)
    return sam.eval() if state is None else load_strict(sam, state, model_type)


def encoder_module(sam) -> torch.nn.Module:
    return sam.image_encoder


def reference_context():
    """TinyViT's windowed attention holds little at once: nothing to bound."""
    return contextlib.nullcontext()


def export_context():
    return contextlib.nullcontext()
