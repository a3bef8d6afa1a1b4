"""SAM 2 and SAM 2.1 on images (``sam2.1_hiera_tiny`` ... ``sam2_hiera_large``): a Hiera
image encoder whose feature pyramid gives the decoder two high-resolution maps besides the
image embedding, and SAM's prompt encoder and mask decoder with those maps fused in.

Code: the ``sam2`` module. PyPI ``rf-sam-2`` 1.0.3 is a pure-Python wheel of it (Apache-2.0,
Meta's configs for 2.0 and 2.1 inside) and is what ``sam-onnx[export]`` installs: Meta's own
``sam2`` 1.1.0 is an sdist whose build imports torch, so it fails in a fresh environment that
installs both at once (the README's one install command). Checkpoints are Meta's file names,
recognised by the Hiera's width and depth, and 2.1 from 2.0 by 2.1's spatial no-object
embedding.

Video (memory attention across frames) is not here: see docs/contracts.md.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping, Tuple

from ...core.errors import CheckpointError
from ..base import Family
from .blocks import to_blocks
from .contracts import ALIASES, BLOCKS, CONTRACTS, POSTPROCESS, PREPROCESS, RECOGNISED_ONLY

PATCH_EMBED = "image_encoder.trunk.patch_embed.proj.weight"
_BLOCK = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")
#: Only SAM 2.1 checkpoints have it (its configs' no_obj_embed_spatial).
SAM21_ONLY = "no_obj_embed_spatial"
#: Hiera size -> (patch embedding width, blocks), from Meta's configs.
SIZES: Dict[str, Tuple[int, int]] = {
    "tiny": (96, 12), "small": (96, 16), "base_plus": (112, 24), "large": (144, 48)}
_CONFIG_SUFFIX = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
#: Model name -> (version, size); names as Meta's checkpoint files.
MODEL_SPECS: Dict[str, Tuple[str, str]] = {
    f"{version}_hiera_{size}": (version, size) for version in ("sam2.1", "sam2") for size in SIZES}
#: Where Meta publishes each version's checkpoints, under segment_anything_2/.
_RELEASES = {"sam2.1": "092824", "sam2": "072824"}
KEYS = (PATCH_EMBED, "sam_mask_decoder.iou_token.weight",
        "sam_prompt_encoder.no_mask_embed.weight")


def config(model_type: str) -> str:
    """The Hydra config sam2's build_sam2 takes for a model name."""
    version, size = MODEL_SPECS[model_type]
    return f"configs/{version}/{version}_hiera_{_CONFIG_SUFFIX[size]}.yaml"


def identify(state: Mapping, path: Path = Path("checkpoint")) -> str:
    """The model whose Hiera (width, depth) and version the state_dict has."""
    width = int(state[PATCH_EMBED].shape[0])
    depth = len({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    version = "sam2.1" if SAM21_ONLY in state else "sam2"
    for size, dims in SIZES.items():
        if dims == (width, depth):
            return f"{version}_hiera_{size}"
    raise CheckpointError(
        f"{path} is a SAM 2-like checkpoint with a {depth}-block, {width}-wide Hiera, which "
        f"matches none of {', '.join(SIZES)}")


SAM2 = Family(
    name="sam2",
    doc="SAM 2 / 2.1 on images: Hiera image encoders with a feature pyramid; the mask decoder "
    "fuses two high-resolution maps.",
    checkpoints={name: f"{_RELEASES[version]}/{name}.pt"
                 for name, (version, _) in MODEL_SPECS.items()},
    checkpoint_url="https://dl.fbaipublicfiles.com/segment_anything_2/",
    contracts=CONTRACTS,
    preprocess=PREPROCESS,
    postprocess=POSTPROCESS,
    keys=KEYS,
    identify=identify,
    torch_side="sam_onnx.families.sam2.modeling",
    torch_requires=(("torch", "torch"), ("sam2", "rf-sam-2"), ("hydra", "hydra-core")),
    decoder_forms={"official": "sam2_official", "batched": "sam2_batched"},
    graph_pads=True,
    aliases=ALIASES,
    recognised_only=RECOGNISED_ONLY,
    embedding="image_embed",
    generator_defaults={"pred_iou_thresh": 0.8},
    derived_inputs={name: (source, to_blocks) for name, source in BLOCKS.items()},
)
