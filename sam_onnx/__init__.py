"""sam-onnx: export Segment Anything to ONNX, validate and repair graphs, run them on ONNX
Runtime, and prove parity and speed against PyTorch.

Importing the package needs only ONNX Runtime; torch is imported by the functions that
export or compare against PyTorch, never by the runtime. The public names below are loaded
when first used, so ``import sam_onnx`` stays cheap.
"""
import importlib

from . import backend  # noqa: F401  (fails early, naming the extra to install)
from .core.contracts import GraphContract, Postprocess, Preprocess, TensorSpec, Tolerance
from .core.errors import CheckpointError, ParityError, SamOnnxError
from .families import CONTRACTS, DECODER_CONTRACTS, FAMILIES, MODEL_NAMES, Family
from .families.sam.contracts import ENCODER

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_LAZY = {
    "export": "exporter.run",
    "ExportResult": "exporter.run",
    "validate": "tools.validate",
    "validate_pair": "graph.validate",
    "Report": "graph.findings",
    "repair": "tools.repair",
    "check": "tools.check",
    "segment_dataset": "tools.dataset",
    "SamOnnxPredictor": "runtime.predictor",
    "SamOnnxAutomaticMaskGenerator": "runtime.automatic",
    "SessionConfig": "runtime.sessions",
    "ProviderFallbackWarning": "runtime.sessions",
}

__all__ = ["CONTRACTS", "DECODER_CONTRACTS", "ENCODER", "FAMILIES", "MODEL_NAMES", "Family",
           "GraphContract", "TensorSpec", "Tolerance", "Preprocess", "Postprocess",
           "SamOnnxError", "CheckpointError", "ParityError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sam_onnx' has no attribute {name!r}")
