"""The one import of onnxruntime, with the fix when it is missing; which build is imported;
what IR and opset versions it loads.

``onnxruntime`` and ``onnxruntime-gpu`` install the same module and must never both be
installed, so sam-onnx takes neither by default: the user picks an extra. The graph layer
(validate's version rules) and the runtime (sessions) both read this module; it imports
nothing of sam-onnx's but core.
"""
import functools
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Tuple

try:
    import onnxruntime
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "sam-onnx needs ONNX Runtime, which is not installed: "
        "pip install 'sam-onnx[cpu]' (or 'sam-onnx[gpu]' for CUDA; never both)"
    ) from exc

#: The onnxruntime builds: each is the same ``onnxruntime`` module, one shadows the others.
PACKAGES = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")


def installed_packages() -> dict:
    """ONNX Runtime distributions installed, and which one ``import onnxruntime`` loads."""
    found = {}
    for dist in PACKAGES:
        try:
            found[dist] = version(dist)
            owner = Path(distribution(dist).locate_file("onnxruntime/__init__.py"))
            if owner.resolve() == Path(onnxruntime.__file__).resolve():
                found["imported"] = dist
        except PackageNotFoundError:
            pass
    return found


@functools.lru_cache(maxsize=None)
def runtime_limits() -> Tuple[int, int]:
    """(max IR version, max ai.onnx opset) the installed ONNX Runtime loads, found by trying.

    A raw load probe, not a session to run: runtime.sessions.create is for those."""
    import onnx
    from onnx import helper

    def loads(ir: int, opset: int) -> bool:
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = ir
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4
        try:
            onnxruntime.InferenceSession(model.SerializeToString(), options,
                                         providers=["CPUExecutionProvider"])
            return True
        except Exception:
            return False

    ir = next(v for v in range(onnx.IR_VERSION + 4, 2, -1) if loads(v, 11))
    opset = next(v for v in range(onnx.defs.onnx_opset_version() + 4, 6, -1) if loads(7, v))
    return ir, opset


__all__ = ["onnxruntime", "PACKAGES", "installed_packages", "runtime_limits"]
