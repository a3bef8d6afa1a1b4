"""The one place ONNX Runtime sessions are built: providers asked for, providers really used,
and, when CUDA, TensorRT or OpenVINO was asked for but the session runs on CPU, why.

ONNX Runtime falls back to CPU with at most a log line; here the fallback is said once through
``warnings`` (and ``logging``) with the reason found, or raised with ``strict=True``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..backend import installed_packages
from ..backend import onnxruntime as ort
from ..core.errors import SamOnnxError
from ..core.files import part_file

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT, "openvino": OPENVINO}
_warned: set = set()


class ProviderFallbackWarning(UserWarning):
    """A GPU or OpenVINO provider was asked for and the session runs on CPU."""


@dataclass(frozen=True)
class SessionConfig:
    """What users tune: providers (names like "cuda" or ONNX Runtime's), threads, graph
    optimization level, and a folder caching optimized models so a second start is faster."""

    providers: Sequence[str] = ("cuda", "cpu")
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    optimization: str = "all"  # disable, basic, extended, all
    cache_dir: Optional[Path] = None
    strict: bool = False  # raise instead of falling back to CPU
    #: No pre-packed weight copies, no arena keeping freed activations: for one-off runs of big
    #: graphs (the exporter's checks), at some speed.
    low_memory: bool = False
    #: ONNX Runtime's memory pattern plans buffers for one set of input shapes: for graphs
    #: fed varying shapes (decoders) it only makes the first run 3x slower (measured).
    memory_pattern: bool = True
    #: ONNX Runtime graph transformers to skip (``optimization.disable_specified_optimizers``).
    disabled_optimizers: Tuple[str, ...] = ()


@dataclass
class Session:
    """An InferenceSession with what was asked for and what runs."""

    inner: "ort.InferenceSession"
    requested: List[str]
    active: List[str]
    fallback_reason: Optional[str] = None
    fallback_message: Optional[str] = None
    input_names: List[str] = field(default_factory=list)
    output_names: List[str] = field(default_factory=list)

    def run(self, outputs, feed, release_memory: bool = False):
        """``release_memory``: hand the run's activations back at its end (ONNX Runtime's
        arena keeps them otherwise), for graphs run once in a while, like the encoder."""
        if not release_memory:
            return self.inner.run(outputs, feed)
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return self.inner.run(outputs, feed, options)


def provider_name(name: str) -> str:
    """ONNX Runtime's name for a provider given as "cuda", "openvino" ... or as its own."""
    key = name.lower().replace("executionprovider", "")
    if key in PROVIDER_NAMES:
        return PROVIDER_NAMES[key]
    if name in PROVIDER_NAMES.values():
        return name
    raise SamOnnxError(f"unknown provider {name!r}; use {', '.join(PROVIDER_NAMES)}")


def unavailable_reason(provider: str) -> Optional[str]:
    """Why ``provider`` (ONNX Runtime's name) cannot run here; None when nothing is found."""
    return openvino_unavailable_reason() if provider == OPENVINO else gpu_unavailable_reason()


def openvino_unavailable_reason() -> Optional[str]:
    """OpenVINO comes only in its own onnxruntime build, onnxruntime-openvino."""
    packages = installed_packages()
    if packages.get("imported") == "onnxruntime-openvino":
        return None
    if "onnxruntime-openvino" in packages:
        return (f"onnxruntime-openvino is installed but "
                f"{packages.get('imported', 'another onnxruntime build')} shadows it: uninstall "
                "every onnxruntime package, then pip install 'sam-onnx[openvino]'")
    return ("OpenVINO needs its own onnxruntime build: pip uninstall onnxruntime "
            "onnxruntime-gpu, then pip install 'sam-onnx[openvino]'")


def gpu_unavailable_reason() -> Optional[str]:
    """Why CUDA cannot run here, in the order a user would fix it; None when it can."""
    packages = installed_packages()
    wrong_build = _gpu_build_reason(packages)
    if wrong_build:
        return wrong_build
    reasons = list(_cuda_library_reasons())
    if reasons and "onnxruntime" in packages:
        reasons.append("the CPU-only onnxruntime is installed too: uninstall it")
    return "; ".join(reasons) or None


def _gpu_build_reason(packages: dict) -> Optional[str]:
    """Which onnxruntime build is imported, when it is not onnxruntime-gpu."""
    if packages.get("imported") == "onnxruntime-openvino":
        return ("onnxruntime-openvino is installed, which has no CUDA: pip uninstall "
                "onnxruntime-openvino, then pip install 'sam-onnx[gpu]'")
    if packages.get("imported") == "onnxruntime-gpu":
        return None
    if "onnxruntime-gpu" in packages:
        return ("onnxruntime-gpu is installed but the CPU-only onnxruntime shadows it: "
                "uninstall both, then pip install 'sam-onnx[gpu]'")
    return ("the CPU-only onnxruntime package is installed: pip uninstall onnxruntime, "
            "then pip install 'sam-onnx[gpu]'")


@functools.lru_cache(maxsize=None)
def _cuda_library_reasons() -> Tuple[str, ...]:
    """What of driver, CUDA/cuDNN libraries and device onnxruntime-gpu cannot find, looked
    for once a process. Where anything is missing, sessions are not asked for CUDA at all:
    ONNX Runtime would try to load its CUDA provider and print its own "Failed to load
    library ..." error lines around ours."""
    if hasattr(ort, "preload_dlls"):  # use the nvidia-* pip packages' CUDA/cuDNN if present
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                ort.preload_dlls()
        except Exception:  # preload is best effort; what still fails is named below
            pass
    reasons = []
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        reasons.append("no NVIDIA driver: libcuda.so.1 cannot be loaded (install the driver, "
                       "or run where a GPU is)")
    provider_lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if provider_lib.exists():
        try:
            ctypes.CDLL(str(provider_lib))
        except OSError as exc:
            missing = str(exc).split(":")[0]
            reasons.append(f"CUDA/cuDNN libraries missing: {missing} cannot be loaded (install "
                           "the CUDA and cuDNN versions this onnxruntime-gpu needs)")
    if not reasons:
        try:
            count = ctypes.c_int(0)
            cudart = ctypes.CDLL("libcudart.so")
            if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
                reasons.append("no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
        except OSError:
            pass
    return tuple(reasons)


def _options(config: SessionConfig) -> "ort.SessionOptions":
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if config.optimization not in levels:
        raise SamOnnxError(f"unknown optimization level {config.optimization!r}; use one of "
                           f"{', '.join(levels)}")
    options.graph_optimization_level = levels[config.optimization]
    options.log_severity_level = 3  # ONNX Runtime's own fallback chatter: we say it once
    options.enable_mem_pattern = config.memory_pattern
    # Callers do numpy work right after a run (upscaling, mask filtering); ONNX Runtime's
    # threads spinning on for work would take a core from it. The next run wakes them.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if config.disabled_optimizers:
        options.add_session_config_entry("optimization.disable_specified_optimizers",
                                         ",".join(config.disabled_optimizers))
    if config.low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    return options


def _requested(config: SessionConfig) -> List[str]:
    """``config.providers`` by ONNX Runtime's names, CPU last if not asked for."""
    requested = [provider_name(p) for p in config.providers]
    return requested if CPU in requested else requested + [CPU]


def runnable_providers(config: SessionConfig) -> List[str]:
    """The providers a session made with ``config`` is asked for, in order: those asked for
    that this machine has (CUDA only where its libraries and a device are found), else CPU."""
    return [p for p in _requested(config) if p in ort.get_available_providers()
            and not (p in (CUDA, TENSORRT) and _cuda_library_reasons())] or [CPU]


def create(model: Union[os.PathLike, str, bytes],
           config: SessionConfig = SessionConfig(), name: Optional[str] = None,
           warn: bool = True) -> Session:
    """Build a session asking for ``config.providers`` in order, and report a CPU fallback.

    ``model`` is a path, or serialized bytes for a graph held in memory (not cached);
    ``name``: what messages call it (default: the file's name); ``warn=False``: the caller
    says the fallback with ``warn_fallback``."""
    in_memory = isinstance(model, bytes)
    name = name or ("<in-memory graph>" if in_memory else Path(model).name)
    requested = _requested(config)
    runnable = runnable_providers(config)
    ort.set_default_logger_severity(3)  # ONNX Runtime's own fallback log: said once below
    options = _options(config)
    cached = None if in_memory else _cached_model(Path(model), config, runnable)
    with contextlib.ExitStack() as writing:
        if cached is not None and cached.exists():
            source = str(cached)  # already optimized: skip the optimizer on this start
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            source = model if in_memory else str(model)
            if cached is not None:  # written under a part name, renamed once complete
                cached.parent.mkdir(parents=True, exist_ok=True)
                options.optimized_model_filepath = str(writing.enter_context(part_file(cached)))
                options.add_session_config_entry(  # big weights beside it, as in the source
                    "session.optimized_model_external_initializers_file_name",
                    cached.name + ".data")
                options.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        inner = _inference_session(source, options, runnable, config,
                                   name if in_memory else str(model))
    active = inner.get_providers()
    session = Session(inner, requested, active, input_names=[i.name for i in inner.get_inputs()],
                      output_names=[o.name for o in inner.get_outputs()])
    asked = [p for p in requested if p != CPU]
    if asked and not any(p in active for p in asked):
        session.fallback_reason = unavailable_reason(asked[0]) or (
            f"ONNX Runtime did not enable {', '.join(asked)} (see its log with "
            "log_severity_level=0)")
        message = (f"{', '.join(asked)} requested but {name} runs on "
                   f"CPUExecutionProvider: {session.fallback_reason}")
        if config.strict:
            raise SamOnnxError(message)
        session.fallback_message = message
        if warn:
            warn_fallback(session, stacklevel=3)
    return session


def warn_fallback(session: Session, stacklevel: int = 2) -> None:
    """Say a session's CPU fallback, once per reason (not once per graph); for a session
    built with ``create(..., warn=False)`` on another thread, from the caller's own."""
    if session.fallback_message and session.fallback_reason not in _warned:
        _warned.add(session.fallback_reason)
        log.debug("%s", session.fallback_message)
        warnings.warn(session.fallback_message, ProviderFallbackWarning, stacklevel=stacklevel)


def _inference_session(source, options, providers: List[str], config: SessionConfig,
                       name: str) -> "ort.InferenceSession":
    """ONNX Runtime's session, or its refusal in one line with the command that says more."""
    try:
        return ort.InferenceSession(source, options, providers=[
            (p, _provider_options(p, config)) for p in providers])
    except Exception as exc:  # ONNX Runtime raises its own Fail, InvalidGraph, NoSuchFile...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SamOnnxError(f"ONNX Runtime cannot load {name}: {first}; see what is wrong with "
                           f"sam-onnx validate {name}") from None


def _provider_options(provider: str, config: SessionConfig) -> dict:
    """OpenVINO compiles the graph itself: its threads and its compiled-model cache are its
    own options (ONNX Runtime's intra-op threads and optimized-model file do not reach it)."""
    if provider != OPENVINO:
        return {}
    options = {"device_type": "CPU"}
    if config.intra_op_threads:
        options["num_of_threads"] = str(config.intra_op_threads)
    if config.cache_dir is not None:
        options["cache_dir"] = str(Path(config.cache_dir) / "openvino")
    return options


def _cached_model(path: Path, config: SessionConfig, providers: List[str]) -> Optional[Path]:
    """Where the optimized graph for this model, ONNX Runtime version and the providers that
    run it is kept; None under OpenVINO, which caches its compiled model itself (ONNX Runtime
    cannot save a graph an execution provider compiled)."""
    if config.cache_dir is None or OPENVINO in providers:
        return None
    import hashlib

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{ort.__version__}|"
                         f"{providers}|{config.optimization}|{sorted(config.disabled_optimizers)}"
                         .encode()).hexdigest()[:16]
    return Path(config.cache_dir) / f"{path.stem}.{key}.opt.onnx"
