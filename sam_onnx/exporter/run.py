"""``sam_onnx.export``: write SAM's encoder and decoder graphs, check them, then publish them.

Two child processes do the work, each freeing all it held when it exits: the PyTorch half
(``torch_export``: weights, reference outputs, export, metadata) writes into a staging
folder; the check half, which never imports torch, checks every staged graph
(``onnx.checker``, the declared contract, ONNX Runtime runs, parity with PyTorch within the
contract's tolerance). Only then does this process rename the files to their final names,
with a manifest.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import onnx

from ..core.contracts import GraphContract
from ..core.errors import ParityError, SamOnnxError
from ..core.files import Staging, atomic_write, external_data_files, has_external_data, locked
from ..core.parity import ParityReport, report
from ..core.processes import run_fresh
from ..core.stages import Stages
from ..families import family_of, get_contract
from ..graph import metadata, signature
from ..graph.io import read_proto
from ..runtime import sessions
from ..runtime.sessions import SessionConfig
from . import paging
from .job import Job, Staged

log = logging.getLogger("sam_onnx.export")

DEFAULT_OPSET = 18
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
           decoder_contract: str = "official", encoder_contract: str = "tensor",
           opset: int = DEFAULT_OPSET, simplify: bool = False, quantize: Optional[str] = None,
           encoder: bool = True, decoder: bool = True, progress: bool = True,
           isolate: bool = True) -> ExportResult:
    """Export, check and publish the graphs of one SAM model; see the module docstring.

    ``encoder_contract``: ``tensor`` (the pre-processed 1x3x1024x1024 input) or ``image``
    (the resized image itself, HxWx3: pre-processing inside the graph, as AnyLabeling feeds).
    ``decoder_contract``: ``official``, ``official_single`` (one mask, as segment-anything's
    ``--return-single-mask``), ``lowres`` or ``batched``, or a family's own contract name.

    ``isolate=False`` runs both halves in this process: quicker to start, but the model
    stays in memory through the checks.
    """
    if not (encoder or decoder):
        raise SamOnnxError("nothing to export: drop --no-encoder or --no-decoder")
    family = family_of(model_type)
    decoder_contract = family.decoder_contract(decoder_contract)
    if quantize not in (None, *QUANTIZATIONS):
        raise SamOnnxError(f"unknown quantization {quantize!r}; use one of: "
                           f"{', '.join(QUANTIZATIONS)}")
    family.require_torch()  # or say which extra to install, before any work
    read_manifest(Path(out_dir) / f"{model_type}_manifest.json")  # refused before any work
    contracts = [family.encoder_contract(encoder_contract)] * encoder + \
        [get_contract(decoder_contract)] * decoder
    try:
        return _export(model_type, checkpoint, random_weights, Path(out_dir), contracts,
                       opset, simplify, quantize, progress, isolate)
    except OSError as exc:  # a full disk, a file size limit: said in one line, nothing kept
        raise SamOnnxError(f"cannot write the graphs to {out_dir} ({exc.strerror or exc}); "
                           "free space there or pass another --out; nothing was written") \
            from None


def _export(model_type: str, checkpoint: Optional[Path], random_weights: bool, out_dir: Path,
            contracts: List[GraphContract], opset: int, simplify: bool,
            quantize: Optional[str], progress: bool, isolate: bool) -> ExportResult:
    """Stage, check and publish the graphs (see the module docstring)."""
    manifest_path = out_dir / f"{model_type}_manifest.json"
    with Staging(out_dir) as staging:
        job = Job(model_type=model_type, checkpoint=checkpoint, random_weights=random_weights,
                  contracts=tuple(c.name for c in contracts), staging_dir=staging.dir,
                  opset=opset, simplify=simplify, progress=progress)
        staged = _run(_torch_half, (job,), isolate, "PyTorch export")
        exported, check_timings = _run(_check_half, (staged, quantize), isolate,
                                       "ONNX Runtime check")
        record = next(iter(staged.records.values()))
        result = ExportResult(model_type, record["weights"], record["weights_source"],
                              out_dir, exported, manifest_path,
                              {**staged.timings, **check_timings})
        with locked(result.out_dir):  # another export publishing here waits its turn
            manifest = read_manifest(manifest_path)
            staging.commit(p.name for p in staging.dir.iterdir())
            for g in exported:
                g.path = result.out_dir / g.path.name
            _update_manifest(manifest, result, record)
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
                quantize_int8(path, qpath, per_channel=contract.role == "encoder")
                metadata.stamp(qpath, contract, {**record, "precision": quantize})
            with stage(f"check {contract.role} ({quantize})"):
                exported.append(_check(qpath, contract, quantize, checks))
    return exported, stage.timings


def _run(half, args: tuple, isolate: bool, what: str):
    """Run one half of the export, in a fresh child process unless ``isolate`` is False:
    what it held (torch and the model; ONNX Runtime's sessions) is gone when it exits."""
    if not isolate:
        return half(*args)
    return run_fresh(half, *args, died=(
        f"the {what} process died (out of memory?); nothing was written. "
        "Free memory or export one graph at a time (--no-encoder / --no-decoder)"))


def _torch_half(job: Job):
    """The PyTorch half; imports torch in the process that runs it, never in the parent
    of an isolated export."""
    from .torch_half import run

    return run(job)


def quantize_int8(src: Path, dst: Path, *, per_channel: bool,
                  reduce_range: bool = True) -> None:
    """Dynamic int8 for the matrix products only. Convolutions stay fp32: ONNX Runtime's
    ConvInteger is slower than its fp32 Conv, and the encoder's neck convolutions write the
    embedding itself (vit_b, measured: quantizing them too made the encoder slower and its
    error 2.7% instead of 2.1%, and the automatic masks fell below IoU 0.98).

    Weights in 7 bits (``reduce_range``): on an AVX2 CPU without VNNI, ONNX Runtime multiplies
    uint8 activations by int8 weights with an instruction whose 16-bit sums saturate, which
    ONNX Runtime's quantization guide says 7-bit weights avoid; the error is then the
    running machine's, not the exporting one's (sam2.1 tiny encoder on an AVX2 host, measured:
    image_embed off by 26% of its range with 8 bits, over the int8 tolerance, and by 3.7% with
    7; the same speed, 1.86 vs 1.80 s).

    Encoders get a scale per output column (``per_channel``): it gives back the bit where 7
    made it worse, MobileSAM's TinyViT. ``scripts/bench_int8.py`` on groceries.jpg, RMS error
    of the embedding with 8 bits / 7 / 7 and a scale a column: vit_t 8.2 / 14.6 / 8.7%, vit_b
    25.2 / 2.7 / 2.6%, sam2.1 tiny 27.5 / 2.7 / 2.8%; times within this host's noise. Decoders
    keep one scale a weight: ONNX Runtime's DynamicQuantizeMatMul refuses per-column zero
    points on their 3-D per-head weights (measured, random weights). ``reduce_range=False``
    is there for that script's 8-bit row."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_logging():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], reduce_range=reduce_range,
                         per_channel=per_channel,
                         use_external_data_format=has_external_data(src))


def _check(path: Path, contract: GraphContract, precision: str,
           checks: Dict[str, tuple]) -> ExportedGraph:
    """onnx.checker, declared inputs/outputs, one ONNX Runtime run per feed, parity."""
    try:
        onnx.checker.check_model(str(path))  # path-based: works beyond 2 GB
    except onnx.checker.ValidationError as exc:
        raise SamOnnxError(f"the exported {path.name} fails onnx.checker: "
                           f"{str(exc).splitlines()[0]}") from None
    problems = signature.mismatches(read_proto(path), contract)
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


def read_manifest(path: Path) -> Dict:
    """A folder's manifest for one model: ``exports`` (each export's provenance and stage
    timings, by id) and ``graphs`` (each graph file's contract, files and parity, and the id
    of the export that wrote it); empty when there is none yet. One that is not a manifest is
    refused, never replaced."""
    if not path.exists():
        return {"exports": [], "graphs": []}
    try:
        doc = json.loads(path.read_text())
        if "exports" not in doc:  # written before manifests were merged: one export
            provenance = {k: v for k, v in doc.items() if k not in ("model_type", "graphs")}
            doc = {"model_type": doc["model_type"], "exports": [{"id": 1, **provenance}],
                   "graphs": [{**g, "export": 1} for g in doc["graphs"]]}
        ids = {e["id"] for e in doc["exports"]}
        if not all(g["export"] in ids and "path" in g for g in doc["graphs"]):
            raise ValueError("a graph names no export")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SamOnnxError(f"{path} is not a sam-onnx manifest ({exc}); move it away, or "
                           "export to another --out folder (it is never overwritten)") from None
    return doc


def _update_manifest(doc: Dict, result: ExportResult, record: Dict) -> None:
    """Add this export to the folder's manifest ``doc``: its graphs replace the entries of the
    same files; the other graphs, and the exports that wrote them, stay."""
    export_id = max((e["id"] for e in doc["exports"]), default=0) + 1
    written = {g.path.name for g in result.graphs}
    graphs = [g for g in doc["graphs"] if g["path"] not in written]
    graphs += [{**g.to_dict(), "export": export_id} for g in result.graphs]
    used = {g["export"] for g in graphs}
    exports = [e for e in doc["exports"] if e["id"] in used] + [{
        "id": export_id,
        "random_weights": result.random_weights,
        "weights": result.weights,
        "weights_source": result.weights_source,
        "preprocess": record["preprocess"],
        "versions": record["versions"],
        "opset": record["opset"],
        "timings_s": result.timings,
    }]
    text = json.dumps({"model_type": result.model_type, "exports": exports, "graphs": graphs},
                      indent=2) + "\n"
    atomic_write(result.manifest, lambda tmp: tmp.write_text(text),
                 "free space in the output folder; the graphs are written, the manifest not")


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
