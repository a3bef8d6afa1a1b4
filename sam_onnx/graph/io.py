"""Reading and writing graphs: the protobuf without its weights, the opset, onnxsim, and the
protobuf size limit past which weights must live in external data."""
from __future__ import annotations

from pathlib import Path

import onnx

from ..core.errors import SamOnnxError

#: Protobuf's limit: a graph beyond this must keep its weights in external data.
PROTOBUF_LIMIT = 2**31 - 1


def read_proto(path: Path) -> onnx.ModelProto:
    """The graph's protobuf only: names, shapes, metadata; external weights are not loaded."""
    return onnx.load(str(path), load_external_data=False)


def opset(model: onnx.ModelProto) -> int:
    """The ai.onnx opset a graph imports (0 when none)."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def simplify(model: onnx.ModelProto, retry: str) -> onnx.ModelProto:
    """onnxsim's simplified graph, checked by onnxsim itself; ``retry`` says how to go on
    without it (e.g. "export again without --simplify")."""
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise SamOnnxError(f"onnxsim could not verify the simplified graph; {retry}")
    return simplified
