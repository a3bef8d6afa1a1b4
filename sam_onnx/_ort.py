"""The one import of onnxruntime, with the fix when it is missing.

``onnxruntime`` and ``onnxruntime-gpu`` install the same module and must never both be
installed, so sam-onnx takes neither by default: the user picks an extra.
"""
try:
    import onnxruntime
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "sam-onnx needs ONNX Runtime, which is not installed: "
        "pip install 'sam-onnx[cpu]' (or 'sam-onnx[gpu]' for CUDA; never both)"
    ) from exc

__all__ = ["onnxruntime"]
