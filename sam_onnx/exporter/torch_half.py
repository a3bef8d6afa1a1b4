"""The PyTorch half of an export: weights, reference outputs and the exported graphs.

It runs in its own process (see ``exporter.run``), so the model, torch and the exporters'
caches are gone before ONNX Runtime loads the graphs to check them.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx_ir.passes import common

from ..core.contracts import GraphContract
from ..core.errors import SamOnnxError
from ..core.files import has_external_data
from ..core.stages import Stages
from ..families import family_of, get_contract
from ..graph import io as graph_io
from ..graph import metadata
from . import paging
from .checkpoints import Weights, load_weights
from .job import Job, Staged

log = logging.getLogger("sam_onnx.export")


def run(job: Job) -> Staged:
    stage = Stages()
    with stage(f"load {job.model_type} weights"):
        weights = load_weights(job.model_type, job.checkpoint, random_weights=job.random_weights,
                               progress=job.progress)
    if weights.random:
        log.warning("random weights: these graphs are for trying the tool and for tests; "
                    "their masks mean nothing")
    mapped = () if weights.random else (Path(weights.source),)
    with paging.paged_out(*mapped):  # the checkpoint is memory-mapped (checkpoints.py)
        return _run(job, weights, stage)


def _run(job: Job, weights: Weights, stage: Stages) -> Staged:
    contracts = [get_contract(name) for name in job.contracts]
    family = family_of(job.model_type)
    side = family.torch()  # the family's builders, wrappers and reference
    with side.reference_context(), stage("PyTorch reference outputs"):
        checks = _reference_checks(side, weights.sam, contracts)
    paths, records = {}, {}
    for contract in contracts:
        # vit_b_encoder, vit_b_encoder_image (another encoder form), vit_b_decoder_official
        name = f"{job.model_type}_" + (contract.role if contract == family.encoder else
                                       contract.name if contract.role == "encoder" else
                                       f"decoder_{contract.name}")
        path = job.staging_dir / (name + ".onnx")
        with stage(f"export {contract.role} ({contract.name})"):
            _EXPORTERS[contract.role](side, weights.sam, contract, path, job.opset, family)
            written = graph_io.opset(graph_io.read_proto(path))
            if written != job.opset:
                raise SamOnnxError(f"the {contract.role} exporter wrote opset {written}, not "
                                   f"{job.opset}; export with --opset {written}")
            if job.simplify:
                _simplify(path)
            records[contract.name] = metadata.provenance(
                contract, model_type=job.model_type, weights_source=weights.source,
                weights_checksum=weights.checksum, exporter=_EXPORTER_NAMES[contract.role],
                opset=job.opset)
            metadata.stamp(path, contract, records[contract.name])
        paths[contract.name] = path
    return Staged(paths, records, checks, stage.timings)


def _reference_checks(side, sam, contracts: List[GraphContract]) -> Dict:
    """Per contract, the feeds to run and PyTorch's outputs for them (decoders on the
    encoder's reference outputs when the encoder is exported too, else on random ones)."""
    reference = side.reference
    checks = {}
    encoded = reference.random_encoder_outputs(sam)
    for contract in contracts:
        if contract.preprocess_inside:  # the image itself, in both orientations
            checks[contract.name] = {
                name: ({"input_image": image}, reference.encoder_reference(
                    sam, {"image": sam.preprocess(torch.from_numpy(image).permute(2, 0, 1)[None])
                          .numpy()}))
                for name, image in _example_images().items()}
            encoded = checks[contract.name]["landscape"][1]
        elif contract.role == "encoder":
            feed = reference.encoder_input()
            encoded = reference.encoder_reference(sam, feed)  # decoders get real embeddings
            checks[contract.name] = {"random image": (feed, encoded)}
        else:
            checks[contract.name] = {
                p.name: (reference.decoder_feed(contract, encoded, p),
                         reference.decoder_reference(sam, contract, encoded, p))
                for p in reference.PROMPTS
            }
    return checks


def _example_images(seed: int = 0) -> Dict[str, np.ndarray]:
    """Random RGB images (0-255, float32) resized as SamPredictor resizes them: longest side
    1024, the other shorter, one landscape and one portrait (a graph whose padding or
    transpose is wrong for either fails its check)."""
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(0, 255, shape).round().astype(np.float32)
            for name, shape in (("landscape", (683, 1024, 3)), ("portrait", (1024, 576, 3)))}


class _PreprocessInside(torch.nn.Module):
    """An encoder taking the resized image itself (HxWx3, RGB 0-255): normalized by the
    family's pixel mean and std, transposed to 1x3xHxW and zero-padded bottom-right to the
    encoder's square, as Sam.preprocess does, then encoded."""

    def __init__(self, encoder: torch.nn.Module, pre) -> None:
        super().__init__()
        self.encoder, self.size = encoder, pre.image_size
        self.register_buffer("mean", torch.tensor(pre.pixel_mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(pre.pixel_std, dtype=torch.float32))

    def forward(self, input_image: torch.Tensor) -> torch.Tensor:
        x = ((input_image - self.mean) / self.std).permute(2, 0, 1)[None]
        h, w = input_image.shape[0], input_image.shape[1]
        return self.encoder(torch.nn.functional.pad(x, (0, self.size - w, 0, self.size - h)))


def _export_encoder(side, sam, contract: GraphContract, path: Path, opset: int,
                    family) -> None:
    """torch.export-based exporter with external data: the only one that fits vit_h in memory.
    An image-input encoder's height and width are dynamic, up to the encoder's size."""
    module, dynamic = side.encoder_module(sam), None
    if contract.preprocess_inside:
        module = _PreprocessInside(module, family.preprocess)
        example = torch.zeros((683, 1024, 3), dtype=torch.float32)
        size = family.preprocess.image_size
        dynamic = {"input_image": {0: torch.export.Dim("image_height", min=2, max=size),
                                   1: torch.export.Dim("image_width", min=2, max=size)}}
    else:
        (spec,) = contract.inputs
        example = torch.zeros(spec.shape, dtype=torch.float32)
    with _quiet(), side.export_context():
        program = torch.onnx.export(module, (example,), dynamo=True, optimize=False,
                                    dynamic_shapes=dynamic,
                                    opset_version=opset, input_names=list(contract.input_names),
                                    output_names=list(contract.output_names))
        _tidy(program.model)
        program.save(str(path), external_data=True)


def _tidy(model) -> None:
    """The exporter's own clean-up (``optimize=True``) less its pattern rewriter, which took a
    quarter of vit_h's graph writing for rewrites ONNX Runtime makes itself at load time
    (measured on vit_b: 3% more nodes, the same ONNX Runtime speed)."""
    common.InlinePass()(model)
    onnxscript.optimizer.fold_constants(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(), common.NameFixPass(),
    )(model)


def _export_decoder(side, sam, contract: GraphContract, path: Path, opset: int,
                    family) -> None:
    """TorchScript exporter: it keeps the upscale to ``orig_im_size`` dynamic, as
    segment-anything's own export script relies on."""
    reference = side.reference
    feed = reference.decoder_feed(contract, reference.random_encoder_outputs(sam),
                                  reference.PROMPTS[0])
    args = tuple(torch.from_numpy(feed[name]) for name in contract.input_names)
    with _quiet():
        torch.onnx.export(side.decoder_module(contract.name, sam), args, str(path), dynamo=False,
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


def _simplify(path: Path) -> None:
    if has_external_data(path):
        log.info("--simplify skipped for %s: onnxsim needs the whole graph in one protobuf "
                 "under 2 GB", path.name)
        return
    onnx.save(graph_io.simplify(onnx.load(str(path)), "export again without --simplify"),
              str(path))
