"""``sam_onnx.export``: write SAM's encoder and decoder graphs, check them, then publish them.

Every graph is exported into a staging folder, stamped with its contract and provenance,
checked (``onnx.checker``, an ONNX Runtime run, parity with PyTorch within the contract's
tolerance) and only then renamed to its final name, with a manifest beside it.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx

from . import graphs, metadata, reference, signature
from ._ort import onnxruntime as ort
from .checkpoints import load_weights
from .contracts import DECODER_CONTRACTS, ENCODER, GraphContract, get_contract
from .errors import ParityError, SamOnnxError
from .parity import ParityReport, report
from .staging import Staging

log = logging.getLogger(__name__)

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


class _Stages:
    """Logs each stage as it starts and ends, and keeps its duration."""

    def __init__(self) -> None:
        self.timings: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        log.info("%s ...", name)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        log.info("%s: %.1f s (RSS %.2f GiB, peak so far %.2f GiB)", name, self.timings[name],
                 _current_rss_gib(), peak)


def _current_rss_gib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**30
    except OSError:  # not Linux
        return float("nan")


def export(model_type: str = "vit_h", checkpoint: Optional[Path] = None, *,
           random_weights: bool = False, out_dir: Path = Path("exported"),
           decoder_contract: str = "official", opset: int = DEFAULT_OPSET,
           simplify: bool = False, quantize: Optional[str] = None, encoder: bool = True,
           decoder: bool = True, progress: bool = True) -> ExportResult:
    """Export, check and publish the graphs of one SAM model; see the module docstring."""
    if not (encoder or decoder):
        raise SamOnnxError("nothing to export: drop --no-encoder or --no-decoder")
    if decoder_contract not in DECODER_CONTRACTS:
        raise SamOnnxError(f"unknown decoder contract {decoder_contract!r}; use one of: "
                           f"{', '.join(DECODER_CONTRACTS)}")
    if quantize not in (None, *QUANTIZATIONS):
        raise SamOnnxError(f"unknown quantization {quantize!r}; use one of: {', '.join(QUANTIZATIONS)}")
    stage = _Stages()
    contracts = [ENCODER] * encoder + [get_contract(decoder_contract)] * decoder
    with Staging(out_dir) as staging:
        with stage(f"load {model_type} weights"):
            weights = load_weights(model_type, checkpoint, random_weights=random_weights,
                                   progress=progress)
        if weights.random:
            log.warning("random weights: these graphs are for trying the tool and for tests; "
                        "their masks mean nothing")
        sam = weights.sam
        with graphs.chunked_attention(), stage("PyTorch reference outputs"):
            checks = _reference_checks(sam, contracts)
        staged = {}
        for contract in contracts:
            name = f"{model_type}_{contract.role}" + (
                f"_{contract.name}" if contract.role == "decoder" else "")
            path = staging.path(name + ".onnx")
            with stage(f"export {contract.role} ({contract.name})"):
                _EXPORTERS[contract.role](sam, contract, path, opset)
                if simplify:
                    _simplify(path)
                record = metadata.provenance(
                    contract, model_type=model_type, weights_source=weights.source,
                    weights_checksum=weights.checksum, exporter=_EXPORTER_NAMES[contract.role],
                    opset=opset)
                _stamp(path, contract, record)
            staged[contract.name] = (path, record)
        _release(sam)  # before ONNX Runtime loads the graphs: both at once would not fit
        del sam, weights

        exported = []
        for contract in contracts:
            path, record = staged[contract.name]
            with stage(f"check {contract.role}"):
                exported.append(_check(path, contract, "fp32", checks[contract.name]))
            if quantize:
                qpath = path.with_name(path.name[:-5] + f".{quantize}.onnx")
                with stage(f"quantize {contract.role} ({quantize})"):
                    _quantize(path, qpath)
                    _stamp(qpath, contract, {**record, "precision": quantize})
                with stage(f"check {contract.role} ({quantize})"):
                    exported.append(_check(qpath, contract, quantize, checks[contract.name]))

        result = ExportResult(model_type, record["weights"], record["weights_source"],
                              Path(out_dir), exported, Path(out_dir) / f"{model_type}_manifest.json",
                              stage.timings)
        manifest = staging.path(result.manifest.name)
        manifest.write_text(json.dumps(_manifest(result, record), indent=2) + "\n")
        staging.commit(p.name for p in staging.dir.iterdir())
    for g in exported:
        g.path = result.out_dir / g.path.name
    return result


def _release(sam) -> None:
    """Free the model's tensors now. The exporter's IR keeps references to the parameters
    after export, so dropping ``sam`` alone would hold the weights through the checks."""
    import torch

    for tensor in [*sam.parameters(), *sam.buffers()]:
        tensor.data = torch.empty(0)
    gc.collect()


def _reference_checks(sam, contracts: List[GraphContract]) -> Dict[str, Dict[str, tuple]]:
    """Per contract, the feeds to run and PyTorch's outputs for them."""
    checks = {}
    embeddings = reference.random_embeddings()
    for contract in contracts:
        if contract.role == "encoder":
            feed = reference.encoder_input()
            ref = reference.encoder_reference(sam, feed)
            embeddings = ref["image_embeddings"]  # the decoder is checked on real embeddings
            checks[contract.name] = {"random image": (feed, ref)}
        else:
            checks[contract.name] = {
                p.name: (reference.decoder_feed(contract, embeddings, p),
                         reference.decoder_reference(sam, contract, embeddings, p))
                for p in reference.PROMPTS
            }
    return checks


def _export_encoder(sam, contract: GraphContract, path: Path, opset: int) -> None:
    """torch.export-based exporter with external data: the only one that fits vit_h in memory."""
    import torch

    (spec,) = contract.inputs
    example = torch.zeros(spec.shape, dtype=torch.float32)
    with _quiet(), graphs.chunked_attention():
        torch.onnx.export(sam.image_encoder, (example,), str(path), dynamo=True,
                          external_data=True, opset_version=opset,
                          input_names=list(contract.input_names),
                          output_names=list(contract.output_names))


def _export_decoder(sam, contract: GraphContract, path: Path, opset: int) -> None:
    """TorchScript exporter: it keeps the upscale to ``orig_im_size`` dynamic, as
    segment-anything's own export script relies on."""
    import torch

    feed = reference.decoder_feed(contract, reference.random_embeddings(), reference.PROMPTS[0])
    args = tuple(torch.from_numpy(feed[name]) for name in contract.input_names)
    with _quiet():
        torch.onnx.export(graphs.decoder_module(contract.name, sam), args, str(path), dynamo=False,
                          opset_version=opset, do_constant_folding=True,
                          input_names=list(contract.input_names),
                          output_names=list(contract.output_names),
                          dynamic_axes=contract.dynamic_axes())


_EXPORTERS = {"encoder": _export_encoder, "decoder": _export_decoder}
_EXPORTER_NAMES = {"encoder": "torch.onnx.export(dynamo=True)",
                   "decoder": "torch.onnx.export(dynamo=False)"}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation chatter; keep it in the debug log."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        yield
    if buf.getvalue():
        log.debug("%s", buf.getvalue())


def _has_external_data(path: Path) -> bool:
    return any(p != path for p in path.parent.glob(path.name + "*"))


def _stamp(path: Path, contract: GraphContract, record: Dict) -> None:
    """Record the contract and provenance, and name the output dims as the contract declares
    them (exporters leave generated names); the weights in external data are not loaded."""
    model = onnx.load(str(path), load_external_data=False)
    metadata.write(model, record)
    declared = {t.name: t for t in contract.outputs}
    for out in model.graph.output:
        if out.name in declared:
            dims = out.type.tensor_type.shape.dim
            del dims[:]
            for d in declared[out.name].shape:
                dims.add(**({"dim_param": d} if isinstance(d, str) else {"dim_value": d}))
    model.graph.doc_string = contract.doc
    onnx.save(model, str(path))


def _simplify(path: Path) -> None:
    import onnxsim

    if _has_external_data(path):
        log.info("--simplify skipped for %s: onnxsim needs the whole graph in one protobuf "
                 "under 2 GB", path.name)
        return
    model, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        raise SamOnnxError(f"onnxsim could not verify the simplified {path.name}; "
                           "export again without --simplify")
    onnx.save(model, str(path))


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         use_external_data_format=_has_external_data(src))


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
    session = ort.InferenceSession(str(path), _lean_session_options(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    per_feed = {}
    for feed_name, (feed, ref) in checks.items():
        outputs = dict(zip(names, session.run(None, feed)))
        per_feed[feed_name] = (outputs, ref)
    del session
    parity = report(path.name, precision, contract.tolerances[precision], per_feed)
    log.info("parity %s", parity.summary())
    if not parity.passed:
        w = parity.worst
        raise ParityError(
            f"{path.name} disagrees with PyTorch on {w.output} for '{w.feed}': max |err| "
            f"{w.max_abs_err:.3g} > allowed {w.allowed:.3g}; nothing was written"
        )
    return ExportedGraph(contract.role, contract, precision, path, parity)


def _lean_session_options() -> "ort.SessionOptions":
    """A session for one check run: no pre-packed weight copies, no arena holding freed
    activations, so a vit_h check stays near the size of its weights."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


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
