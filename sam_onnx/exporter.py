"""``sam_onnx.export``: write SAM's encoder and decoder graphs, check them, then publish them.

Two child processes do the work, each freeing all it held when it exits: the PyTorch half
(``torch_export``: weights, reference outputs, export, metadata) writes into a staging
folder; the check half, which never imports torch, checks every staged graph
(``onnx.checker``, the declared contract, ONNX Runtime runs, parity with PyTorch within the
contract's tolerance). Only then does this process rename the files to their final names,
with a manifest.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import onnx

from . import metadata, paging, sessions, signature
from .contracts import DECODER_CONTRACTS, ENCODER, GraphContract, get_contract
from .errors import ParityError, SamOnnxError
from .parity import ParityReport, report
from .sessions import SessionConfig
from .stages import Stages
from .staging import Staged, Staging, external_data_files, has_external_data

log = logging.getLogger("sam_onnx.export")

DEFAULT_OPSET = 18
#: Protobuf's limit: a graph beyond this must keep its weights in external data.
PROTOBUF_LIMIT = 2**31 - 1
QUANTIZATIONS = ("int8",)
#: Allocations from this size up are mapped and unmapped by glibc, never kept (see _child_init).
MMAP_THRESHOLD = 16 * 2**20


@dataclass
class ExportedGraph:
    role: str
    contract: GraphContract
    precision: str
    path: Path
    parity: ParityReport

    @property
    def files(self) -> List[Path]:
        return sorted(self.path.parent.glob(self.path.name + "*"))

    def to_dict(self) -> dict:
        return {
            "role": self.role,
            "contract": self.contract.name,
            "precision": self.precision,
            "path": self.path.name,
            "files": {p.name: p.stat().st_size for p in self.files},
            "parity": self.parity.to_dict(),
        }


@dataclass
class ExportResult:
    model_type: str
    weights: str  # "sha256:..." or "random"
    weights_source: str
    out_dir: Path
    graphs: List[ExportedGraph]
    manifest: Path
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    def graph(self, role: str, precision: str = "fp32") -> ExportedGraph:
        return next(g for g in self.graphs if g.role == role and g.precision == precision)


def export(model_type: str = "vit_h", checkpoint: Optional[Path] = None, *,
           random_weights: bool = False, out_dir: Path = Path("exported"),
           decoder_contract: str = "official", opset: int = DEFAULT_OPSET,
           simplify: bool = False, quantize: Optional[str] = None, encoder: bool = True,
           decoder: bool = True, progress: bool = True, isolate: bool = True) -> ExportResult:
    """Export, check and publish the graphs of one SAM model; see the module docstring.

    ``isolate=False`` runs both halves in this process: quicker to start, but the model
    stays in memory through the checks.
    """
    if not (encoder or decoder):
        raise SamOnnxError("nothing to export: drop --no-encoder or --no-decoder")
    if decoder_contract not in DECODER_CONTRACTS:
        raise SamOnnxError(f"unknown decoder contract {decoder_contract!r}; use one of: "
                           f"{', '.join(DECODER_CONTRACTS)}")
    if quantize not in (None, *QUANTIZATIONS):
        raise SamOnnxError(f"unknown quantization {quantize!r}; use one of: {', '.join(QUANTIZATIONS)}")
    contracts = [ENCODER] * encoder + [get_contract(decoder_contract)] * decoder
    with Staging(out_dir) as staging:
        job = dict(model_type=model_type, checkpoint=checkpoint, random_weights=random_weights,
                   contracts=tuple(c.name for c in contracts), staging_dir=staging.dir,
                   opset=opset, simplify=simplify, progress=progress)
        staged = _run(_torch_half, (job,), isolate, "PyTorch export")
        exported, check_timings = _run(_check_half, (staged, quantize), isolate,
                                       "ONNX Runtime check")
        record = next(iter(staged.records.values()))
        result = ExportResult(model_type, record["weights"], record["weights_source"],
                              Path(out_dir), exported, Path(out_dir) / f"{model_type}_manifest.json",
                              {**staged.timings, **check_timings})
        manifest = staging.path(result.manifest.name)
        manifest.write_text(json.dumps(_manifest(result, record), indent=2) + "\n")
        staging.commit(p.name for p in staging.dir.iterdir())
    for g in exported:
        g.path = result.out_dir / g.path.name
    return result


def _check_half(staged: Staged, quantize: Optional[str]):
    """Check every staged graph (and quantize it when asked): (graphs, stage timings)."""
    stage = Stages()
    exported = []
    for name, path in staged.paths.items():
        contract, record, checks = get_contract(name), staged.records[name], staged.checks[name]
        with stage(f"check {contract.role}"):
            exported.append(_check(path, contract, "fp32", checks))
        if quantize:
            qpath = path.with_name(path.name[:-5] + f".{quantize}.onnx")
            with stage(f"quantize {contract.role} ({quantize})"):
                _quantize(path, qpath)
                metadata.stamp(qpath, contract, {**record, "precision": quantize})
            with stage(f"check {contract.role} ({quantize})"):
                exported.append(_check(qpath, contract, quantize, checks))
    return exported, stage.timings


def _run(half, args: tuple, isolate: bool, what: str):
    """Run one half of the export, in a fresh child process unless ``isolate`` is False:
    what it held (torch and the model; ONNX Runtime's sessions) is gone when it exits."""
    if not isolate:
        return half(*args)
    level = logging.getLogger("sam_onnx").getEffectiveLevel()
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn, initializer=_child_init,
                                                initargs=(os.getpid(), level)) as pool:
        try:
            return pool.submit(half, *args).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise SamOnnxError(
                f"the {what} process died (out of memory?); nothing was written. "
                "Free memory or export one graph at a time (--no-encoder / --no-decoder)"
            ) from None


def _child_init(parent_pid: int, log_level: int) -> None:
    """Set up an export child: it dies with its parent, logs like it, and hands big
    buffers back to the system when it frees them."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        # A killed export must not leave its worker holding the model.
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        # glibc serves allocations under its adaptive mmap threshold (up to 32 MB) from
        # heaps it keeps; ONNX Runtime's 20-30 MB activations then hold ~1 GB there for the
        # whole vit_h run (measured: 3.1 -> 2.1 GiB). A fixed threshold maps them instead.
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    if os.getppid() != parent_pid:
        os._exit(1)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("sam_onnx")
    logger.handlers[:] = [handler]
    logger.setLevel(log_level)
    logger.propagate = False


def _torch_half(job: dict):
    """The PyTorch half; imports torch in the process that runs it, never in the parent
    of an isolated export."""
    from .torch_export import Job, run

    return run(Job(**job))


def _quantize(src: Path, dst: Path) -> None:
    """Dynamic int8 for the matrix products only. Convolutions stay fp32: ONNX Runtime's
    ConvInteger is slower than its fp32 Conv, and the encoder's neck convolutions write the
    embedding itself (vit_b, measured: quantizing them too made the encoder slower and its
    error 2.7% instead of 2.1%, and the automatic masks fell below IoU 0.98)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_logging():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"],
                         use_external_data_format=has_external_data(src))


def _check(path: Path, contract: GraphContract, precision: str,
           checks: Dict[str, tuple]) -> ExportedGraph:
    """onnx.checker, declared inputs/outputs, one ONNX Runtime run per feed, parity."""
    try:
        onnx.checker.check_model(str(path))  # path-based: works beyond 2 GB
    except onnx.checker.ValidationError as exc:
        raise SamOnnxError(f"the exported {path.name} fails onnx.checker: "
                           f"{str(exc).splitlines()[0]}") from None
    problems = signature.mismatches(onnx.load(str(path), load_external_data=False), contract)
    if problems:
        raise SamOnnxError(f"the exported {path.name} does not follow the {contract.name} "
                           f"contract: {'; '.join(problems)}")
    session = sessions.create(path, SessionConfig(providers=("cpu",), low_memory=True))
    per_feed = {}
    with paging.paged_out(*external_data_files(path)):
        for feed_name, (feed, ref) in checks.items():
            outputs = dict(zip(session.output_names, session.run(None, feed)))
            per_feed[feed_name] = (outputs, ref)
    del session
    parity = report(path.name, precision, contract.tolerances[precision], per_feed)
    log.info("parity %s", parity.summary())
    if not parity.passed:
        w = parity.worst
        raise ParityError(f"{path.name} disagrees with PyTorch on {w.output} for '{w.feed}': "
                          f"{w.describe()}; nothing was written")
    return ExportedGraph(contract.role, contract, precision, path, parity)


def _manifest(result: ExportResult, record: Dict) -> Dict:
    return {
        "model_type": result.model_type,
        "random_weights": result.random_weights,
        "weights": result.weights,
        "weights_source": result.weights_source,
        "preprocess": record["preprocess"],
        "versions": record["versions"],
        "opset": record["opset"],
        "graphs": [g.to_dict() for g in result.graphs],
        "timings_s": result.timings,
    }


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime.quantization reports through the root logger, advice included; hold it to
    errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)
