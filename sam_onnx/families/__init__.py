"""The registry of model families: names -> what each declares (``base.Family``).

The CLI's ``--model`` choices, ``doctor``, docs/contracts.md, validate's contract matching,
the exporter and the runtime all read it. Adding a family is a folder of its own here and one
line in ``FAMILIES``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

from ..core.contracts import GraphContract
from ..core.errors import CheckpointError, SamOnnxError
from .base import Family, by_name
from .mobile_sam import MOBILE_SAM
from .sam import SAM
from .sam import contracts as sam_contracts
from .sam2 import SAM2
from .sam2 import contracts as sam2_contracts
from .sam_hq import SAM_HQ

FAMILIES: Dict[str, Family] = {f.name: f for f in (SAM, MOBILE_SAM, SAM_HQ, SAM2)}

#: Model name -> its family.
MODELS: Dict[str, Family] = {m: f for f in FAMILIES.values() for m in f.models}
MODEL_NAMES: Tuple[str, ...] = tuple(MODELS)
#: Every family's contracts by name (names are unique across families).
CONTRACTS: Dict[str, GraphContract] = {
    name: c for f in FAMILIES.values() for name, c in f.contracts.items()}
DECODER_CONTRACTS: Tuple[str, ...] = tuple(n for n, c in CONTRACTS.items()
                                           if c.role == "decoder")
#: The decoder contracts sam-onnx exports (the others are other tools' forms it recognises).
EXPORTED_DECODERS: Tuple[str, ...] = tuple(n for f in FAMILIES.values()
                                           for n in f.exported_decoders)
#: The decoder contracts ``repair --contract`` converts a decoder to (graph.passes).
CONVERTIBLE: Tuple[str, ...] = (*sam_contracts.CONVERTIBLE, *sam2_contracts.CONVERTIBLE)
#: Other tools' tensor names -> the families' own (ONNX Runtime's SAM 2 names).
ALIASES: Dict[str, str] = {k: v for f in FAMILIES.values() for k, v in f.aliases.items()}


def family_of(model: str) -> Family:
    """The family a model name belongs to, or a one-line error listing the names."""
    return by_name(MODELS, model, "model")


def get_contract(name: str) -> GraphContract:
    return by_name(CONTRACTS, name, "contract")


def identify(state: Mapping, path: Path = Path("checkpoint")) -> str:
    """The model a checkpoint's tensors are: of the families whose ``keys`` it has all of, the
    one that declares the most (HQ-SAM's checkpoints hold SAM's keys too) tells its size."""
    matching = [f for f in FAMILIES.values() if all(key in state for key in f.keys)]
    if matching:
        return max(matching, key=lambda f: len(f.keys)).identify(state, path)
    sample = ", ".join(list(state)[:3]) or "nothing"
    known = "; ".join(f"{f.name}: {f.keys[0]}" for f in FAMILIES.values())
    examples = " or ".join(next(c for c in f.checkpoints.values() if c)
                           for f in FAMILIES.values())
    raise CheckpointError(
        f"{path} is not a SAM checkpoint of any family sam-onnx knows (it holds {sample}...; "
        f"none of {known}); pass one such as {examples}")


def declaring(contract: GraphContract) -> Family:
    """The family that declares ``contract`` (matched by name)."""
    return next(f for f in FAMILIES.values() if contract.name in f.contracts)


def of_graph(record: Mapping) -> Optional[Family]:
    """The family a graph's recorded metadata names (its ``model_type``), None when it records
    none (another tool's export); a model this sam-onnx does not know is refused."""
    model = record.get("model_type")
    if not model:
        return None
    if model not in MODELS:
        raise SamOnnxError(f"the graph was exported from {model!r}, a model this sam-onnx does "
                           f"not know ({', '.join(MODEL_NAMES)}); upgrade sam-onnx")
    return MODELS[model]


__all__ = ["FAMILIES", "MODELS", "MODEL_NAMES", "CONTRACTS", "DECODER_CONTRACTS",
           "EXPORTED_DECODERS", "CONVERTIBLE", "ALIASES", "Family",
           "family_of", "get_contract", "identify", "declaring", "of_graph"]
