"""sam-onnx: export Segment Anything to ONNX, validate and repair graphs, run them on ONNX
Runtime, and prove parity and speed against PyTorch.

Importing the package needs only ONNX Runtime; torch is imported by the functions that
export or compare against PyTorch, never by the runtime.
"""
from . import _ort  # noqa: F401  (fails early, naming the extra to install)
from .contracts import CONTRACTS, DECODER_CONTRACTS, ENCODER, GraphContract, TensorSpec
from .errors import CheckpointError, ParityError, SamOnnxError

__version__ = "0.1.0"
__all__ = ["CONTRACTS", "DECODER_CONTRACTS", "ENCODER", "GraphContract", "TensorSpec",
           "SamOnnxError", "CheckpointError", "ParityError", "export", "validate",
           "validate_pair", "Report", "repair", "SamOnnxPredictor",
           "SamOnnxAutomaticMaskGenerator", "check"]


def __getattr__(name):
    if name == "export":
        from .exporter import export

        return export
    if name in ("validate", "validate_pair", "Report"):
        from . import validator

        return getattr(validator, name)
    if name == "repair":
        from .repairer import repair

        return repair
    if name == "SamOnnxPredictor":
        from .predictor import SamOnnxPredictor

        return SamOnnxPredictor
    if name == "SamOnnxAutomaticMaskGenerator":
        from .automatic import SamOnnxAutomaticMaskGenerator

        return SamOnnxAutomaticMaskGenerator
    if name == "check":
        from .check import check

        return check
    raise AttributeError(f"module 'sam_onnx' has no attribute {name!r}")
