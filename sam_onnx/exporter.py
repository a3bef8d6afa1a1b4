"""``sam_onnx.export``: write SAM's encoder and decoder graphs, check them, then publish them.

The PyTorch half (``torch_export``: weights, reference outputs, export, metadata) runs in
a child process that writes into a staging folder and exits, freeing the model and torch
before this process, which never imports torch, checks every staged graph (``onnx.checker``,
the declared contract, ONNX Runtime runs, parity with PyTorch within the contract's
tolerance). Only then are the files renamed to their final names, with a manifest.
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

from . import metadata, sessions, signature
from .contracts import DECODER_CONTRACTS, ENCODER, GraphContract, get_contract
from .errors import ParityError, SamOnnxError
from .parity import ParityReport, report
from .sessions import SessionConfig
from .stages import Stages
from .staging import Staging, has_external_data

log = logging.getLogger("sam_onnx.export")

DEFAULT_OPSET = 18
#: Protobuf's limit: a graph beyond this must keep its weights in external data.
PROTOBUF_LIMIT = 2**31 - 1
QUANTIZATIONS = ("int8",)


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

    ``isolate=False`` runs the PyTorch half in this process: quicker to start, but the
    model stays in memory through the checks.
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
        staged = _run_torch_half(job, isolate)
        stage = Stages()
        exported = []
        for contract in contracts:
            path, record = staged.paths[contract.name], staged.records[contract.name]
            checks = staged.checks[contract.name]
            with stage(f"check {contract.role}"):
                exported.append(_check(path, contract, "fp32", checks))
            if quantize:
                qpath = path.with_name(path.name[:-5] + f".{quantize}.onnx")
                with stage(f"quantize {contract.role} ({quantize})"):
                    _quantize(path, qpath)
                    metadata.stamp(qpath, contract, {**record, "precision": quantize})
                with stage(f"check {contract.role} ({quantize})"):
                    exported.append(_check(qpath, contract, quantize, checks))

        result = ExportResult(model_type, record["weights"], record["weights_source"],
                              Path(out_dir), exported, Path(out_dir) / f"{model_type}_manifest.json",
                              {**staged.timings, **stage.timings})
        manifest = staging.path(result.manifest.name)
        manifest.write_text(json.dumps(_manifest(result, record), indent=2) + "\n")
        staging.commit(p.name for p in staging.dir.iterdir())
    for g in exported:
        g.path = result.out_dir / g.path.name
    return result


def _run_torch_half(job: dict, isolate: bool):
    if not isolate:
        return _torch_half(job, None)
    level = logging.getLogger("sam_onnx").getEffectiveLevel()
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn, initializer=_die_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        try:
            return pool.submit(_torch_half, job, level).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise SamOnnxError(
                "the PyTorch export process died (out of memory?); nothing was written. "
                "Free memory or export one graph at a time (--no-encoder / --no-decoder)"
            ) from None


def _die_with_parent(parent_pid: int) -> None:
    """A killed export must not leave its worker holding the model: on Linux the kernel
    kills the worker when this process dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def _torch_half(job: dict, log_level: Optional[int]):
    """Entry point of the child process; imports torch there, never here."""
    from .torch_export import Job, run

    if log_level is not None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("sam_onnx")
        logger.handlers[:] = [handler]
        logger.setLevel(log_level)
        logger.propagate = False
    return run(Job(**job))


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_logging():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
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
