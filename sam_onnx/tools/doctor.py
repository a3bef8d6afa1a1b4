"""``sam-onnx doctor``: what this environment can run, and why not when it cannot."""
from __future__ import annotations

import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List

import onnx
from onnx import TensorProto, helper

from ..backend import installed_packages
from ..backend import onnxruntime as ort
from ..core.errors import SamOnnxError
from ..families import FAMILIES
from ..graph.metadata import library_versions
from ..runtime import sessions

_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_features() -> List[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in _CPU_FLAGS if f in flags]


def working_providers() -> Dict[str, str]:
    """Each available provider: 'works' or why a session with it runs on CPU instead."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                                [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path))
        for provider in ort.get_available_providers():
            if provider == "AzureExecutionProvider":
                continue
            with warnings.catch_warnings():  # the fallback is what this reports
                warnings.simplefilter("ignore")
                session = sessions.create(path, sessions.SessionConfig(providers=(provider,)))
            out[provider] = "works" if provider in session.active else (
                session.fallback_reason or "not enabled by ONNX Runtime")
    for provider in (sessions.CUDA, sessions.OPENVINO):
        if provider not in out:
            out[provider] = sessions.unavailable_reason(provider) or "not available"
    return out


def families() -> List[str]:
    """Each family's models, and whether its PyTorch side (export, check, bench) is here."""
    lines = []
    for family in FAMILIES.values():
        try:
            family.require_torch()
            torch_side = "export, check and bench available"
        except SamOnnxError as exc:
            torch_side = f"runtime only: {exc}"
        lines.append(f"  {family.name}: {', '.join(family.models)} ({torch_side})")
    return lines


def report() -> str:
    lines = ["packages:"]
    lines += [f"  {name} {v}" for name, v in library_versions().items()]
    lines.append("families:")
    lines += families()
    packages = installed_packages()
    lines.append(f"  import onnxruntime loads: {packages.get('imported', 'unknown')} "
                 f"({ort.__file__})")
    lines.append(f"providers available: {', '.join(ort.get_available_providers())}")
    lines.append("providers working:")
    lines += [f"  {p}: {status}" for p, status in working_providers().items()]
    lines.append(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"features: {', '.join(cpu_features()) or 'unknown'}")
    lines.append(f"threads: ONNX Runtime intra-op default = {os.cpu_count()} (one per core); "
                 f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    return "\n".join(lines)
