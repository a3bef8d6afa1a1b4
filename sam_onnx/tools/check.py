"""``sam-onnx check``: parity of ONNX graphs with the model family's own code in PyTorch
(segment_anything, mobile_sam, segment_anything_hq, sam2), as rows a person can read: what was
compared, on which image and prompt, how far apart, against which limit.

PyTorch runs the family's own SamPredictor (SAM2ImagePredictor for SAM 2; and its automatic
mask generator for a decoder that batches prompts); ONNX runs SamOnnxPredictor, end to end
(ONNX embeddings into the ONNX decoder), as users run it. Limits are the contracts'
tolerances for the precision checked. Graphs from other exporters work too: the predictor
reads their contract from the graph.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.contracts import Tolerance
from ..core.errors import SamOnnxError
from ..core.parity import compare_records, mask_iou
from ..exporter.checkpoints import load_weights
from ..exporter.run import export
from ..families import family_of
from ..graph import metadata
from ..graph.validate import readable
from ..runtime.automatic import SamOnnxAutomaticMaskGenerator
from ..runtime.images import load_image, synthetic
from ..runtime.predictor import SamOnnxPredictor
from ..runtime.sessions import SessionConfig
from .repair import repair

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
#: The automatic-mask row: a small grid, with thresholds that keep random weights' masks.
AMG_SETTINGS = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                    box_nms_thresh=1.0)


@dataclass(frozen=True)
class Row:
    stage: str  # encoder, decoder, automatic masks
    image: str
    case: str  # what was fed: "embedding", a prompt kind, "records"
    output: str  # the output compared (the graph's name for it)
    metric: str
    value: float
    limit: float
    status: str  # pass, FAIL, skip
    note: str = ""


@dataclass
class CheckReport:
    model_type: str
    precision: str
    encoder: str
    decoder: str
    decoder_contract: str
    weights: str
    reference: str  # the PyTorch code compared with
    providers: List[str] = field(default_factory=list)  # what really ran, not what was asked
    rows: List[Row] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.status != "FAIL" for r in self.rows)

    @property
    def failures(self) -> List[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def summary(self) -> str:
        if self.passed:
            n = sum(r.status == "pass" for r in self.rows)
            return f"PASS: {n} comparisons within the {self.precision} tolerances"
        f = self.failures[0]
        return (f"FAIL: {len(self.failures)} comparison(s) out of tolerance; first: {f.stage} "
                f"output {f.output} on {f.image} ({f.case}): {f.metric} {f.value:.4g}, limit "
                f"{f.limit:.4g}")

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "passed": self.passed,
                "summary": self.summary(), "rows": [asdict(r) for r in self.rows]}

    def render(self, fmt: str) -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2)
        head = ["stage", "image", "case", "output", "metric", "value", "limit", "status"]
        body = [[r.stage, r.image, r.case, r.output, r.metric, f"{r.value:.4g}",
                 f"{r.limit:.4g}", r.status + (f" ({r.note})" if r.note else "")]
                for r in self.rows]
        title = (f"{self.model_type} {self.precision}: {Path(self.encoder).name} + "
                 f"{Path(self.decoder).name} ({self.decoder_contract}) on "
                 f"{', '.join(self.providers)} vs {self.reference}, weights {self.weights}")
        if fmt == "markdown":
            lines = [f"**{title}**", "", "| " + " | ".join(head) + " |",
                     "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in body]
            return "\n".join(lines + ["", f"**{self.summary()}**"])
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
        return "\n".join(lines + [self.summary()])


def default_images() -> List[Tuple[str, np.ndarray]]:
    """Three synthetic images: square, landscape and portrait, of different sizes."""
    return [(f"synthetic {h}x{w}", synthetic(h, w)) for h, w in ((512, 512), (300, 500),
                                                                 (700, 400))]


def prompts(h: int, w: int) -> Dict[str, dict]:
    return {
        "points": dict(point_coords=np.array([[w * 0.35, h * 0.35], [w * 0.8, h * 0.15]]),
                       point_labels=np.array([1, 0])),
        "box": dict(box=np.array([w * 0.15, h * 0.2, w * 0.6, h * 0.7])),
        "points+box": dict(point_coords=np.array([[w * 0.4, h * 0.4]]), point_labels=np.array([1]),
                           box=np.array([w * 0.15, h * 0.2, w * 0.6, h * 0.7])),
    }


def check(model_type: str, checkpoint: Optional[Path] = None, *, random_weights: bool = False,
          encoder: Optional[Path] = None, decoder: Optional[Path] = None,
          export_to: Optional[Path] = None, decoder_contract: str = "official",
          images: Sequence[Path] = (), precision: str = "fp32",
          providers: Sequence[str] = ("cpu",), automatic: bool = True) -> CheckReport:
    """Compare the graphs with PyTorch on every image and prompt; see the module docstring."""
    if precision not in PRECISIONS:
        raise SamOnnxError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
    require_graphs(encoder, decoder, export_to)
    family = family_of(model_type)
    loaded = [(str(p), load_image(p)) for p in images] or default_images()  # bad ones fail now
    if export_to is None:
        for path in (encoder, decoder):
            _same_model(Path(path), model_type)  # refused before minutes of PyTorch work
    side = family.torch()
    log.info("check: building %s in PyTorch (%s)", model_type,
             "random weights" if random_weights else checkpoint or "official checkpoint")
    weights = load_weights(model_type, checkpoint, random_weights=random_weights)
    if export_to is not None:
        log.info("check: exporting the graphs to %s", export_to)
        encoder, decoder = _export(model_type, checkpoint, random_weights, Path(export_to),
                                   decoder_contract, precision)
    for path in (encoder, decoder):
        same_weights(Path(path), weights.checksum)
    onnx_pred = SamOnnxPredictor(encoder, decoder, SessionConfig(providers=tuple(providers)))
    torch_pred = side.SamPredictor(weights.sam)
    contract = onnx_pred.decoder_contract
    tolerances = (family.encoder.tolerances[precision],
                  contract.tolerances.get(precision, family.encoder.tolerances[precision]))
    report = CheckReport(model_type, precision, str(encoder), str(decoder), contract.name,
                         weights.checksum, family.code, onnx_pred.decoder.active)
    for i, (name, img) in enumerate(loaded, 1):
        log.info("check: image %d of %d (%s, %dx%d): encoder, then each prompt kind, ONNX "
                 "Runtime vs %s", i, len(loaded), name, img.shape[1], img.shape[0], family.code)
        report.rows += _image_rows(onnx_pred, torch_pred, side, name, img, tolerances)
    if automatic and onnx_pred.batched:
        log.info("check: automatic masks on %s, ONNX Runtime vs %s", loaded[0][0], family.code)
        settings = {**AMG_SETTINGS, **({"multimask_output": False} if _one_mask(contract) else {})}
        reference = side.SamAutomaticMaskGenerator(weights.sam, **settings)
        report.rows.append(_automatic_row(onnx_pred, reference, *loaded[0], tolerances[1],
                                          settings))
    return report


def require_graphs(encoder, decoder, export_to) -> None:
    """Graphs to compare with PyTorch: both given, or a folder to export them to first."""
    if export_to is None and (encoder is None or decoder is None):
        raise SamOnnxError("give the graphs to compare with PyTorch: --encoder and --decoder, "
                           "or --export-to DIR to export them there first")
    if export_to is not None and (encoder or decoder):
        raise SamOnnxError("give either --encoder/--decoder or --export-to, not both")


def _image_rows(onnx_pred, torch_pred, side, name: str, img: np.ndarray,
                tolerances: Tuple[Tolerance, Tolerance]) -> List[Row]:
    """Every encoder output, then each prompt kind, and each again refined with a mask prompt
    (and with multimask_output=False where the decoder returns a single mask; for HQ-SAM's
    decoders, with the HQ token's mask alone)."""
    enc_tol, dec_tol = tolerances
    contract = onnx_pred.decoder_contract
    onnx_pred.set_image(img)
    torch_pred.set_image(img)
    rows = [_error_row("encoder", name, "embedding", output, onnx_pred.encoded[output], ref,
                       enc_tol) for output, ref in side.predictor_encoded(torch_pred).items()]
    cases = prompts(*img.shape[:2])
    if _one_mask(contract):  # exported with one mask: compared with PyTorch's single mask
        cases = {kind: {**p, "multimask_output": False} for kind, p in cases.items()}
    elif contract.output("iou_predictions").shape[-1] == 4:  # the single mask too
        cases["points single-mask"] = {**cases["points"], "multimask_output": False}
    if "hq_token_only" in contract.input_names:
        cases.update({f"{kind} hq-only": {**p, "hq_token_only": True}
                      for kind, p in list(cases.items())})
    for kind, prompt in cases.items():
        got = onnx_pred.predict(**prompt, return_logits=True)
        want = _reference(torch_pred, contract, prompt)
        rows += _decoder_rows(name, kind, got, want, dec_tol)
        if "mask_input" not in onnx_pred.inputs:
            rows.append(Row("decoder", name, f"{kind} refined", "low_res_masks", "max |err|",
                            0.0, 0.0, "skip", f"the {contract.name} decoder takes no mask_input"))
            continue
        low_res = want[2][np.argmax(want[1])][None]  # the same mask prompt for both
        got = onnx_pred.predict(**prompt, mask_input=low_res, return_logits=True)
        want = _reference(torch_pred, contract, {**prompt, "mask_input": low_res})
        rows += _decoder_rows(name, f"{kind} refined", got, want, dec_tol)
    return rows


def _one_mask(contract) -> bool:
    """A decoder exported to return one mask a prompt, without a switch for more and without
    a rule of its own to pick it (ONNX Runtime's default SAM 2 decoder)."""
    return contract.output("iou_predictions").shape[-1] == 1 and not contract.selects and \
        "multimask_output" not in contract.input_names


def _reference(torch_pred, contract, prompt: dict) -> List[np.ndarray]:
    """The family's PyTorch predictor's (masks, scores, low-res logits) for ``prompt``; for a
    decoder that picks its one mask by segment-anything's select_masks (official_single),
    the mask that rule picks: the single-mask token with three or more points (the padding
    point counted), else the best-scored of the three multimask outputs."""
    if not contract.selects:
        return [np.asarray(a) for a in torch_pred.predict(**prompt, return_logits=True)]
    points = prompt.get("point_coords")
    n = (0 if points is None else len(points)) + (1 if prompt.get("box") is None else 2)
    multimask = n < 3
    got = torch_pred.predict(**{**prompt, "multimask_output": multimask}, return_logits=True)
    best = int(np.argmax(got[1])) if multimask else 0
    return [np.asarray(a)[best:best + 1] for a in got]


def _automatic_row(onnx_pred, reference, name: str, img: np.ndarray, tol: Tolerance,
                   settings: dict) -> Row:
    """The family's own automatic mask generator against ours, record by record."""
    want = reference.generate(img)
    got = SamOnnxAutomaticMaskGenerator(onnx_pred, **settings).generate(img)
    parity = compare_records(want, got)
    passed = parity.passed and parity.min_iou >= tol.min_mask_iou
    return Row("automatic masks", name, "records", "segmentation", "min matched IoU",
               parity.min_iou, tol.min_mask_iou, "pass" if passed else "FAIL",
               f"{parity.count} records, PyTorch {parity.reference_count}")


def _error_row(stage, image, case, output, got, ref, tol: Tolerance) -> Row:
    ref = np.asarray(ref, np.float64)
    limit = tol.atol + tol.rtol * float(np.abs(ref).max())
    if np.shape(got) != ref.shape:
        return Row(stage, image, case, output, "max |err|", float("inf"), limit, "FAIL",
                   f"shape {np.shape(got)}, PyTorch {ref.shape}")
    err = float(np.abs(np.asarray(got, np.float64) - ref).max())
    if not np.isfinite(got).all():
        err = float("inf")
    rel = err / max(float(np.abs(ref).max()), 1e-30)
    return Row(stage, image, case, output, "max |err|", err, limit,
               "pass" if err <= limit else "FAIL", f"relative {rel:.2e}")


def _decoder_rows(image, case, got, want, tol: Tolerance) -> List[Row]:
    masks, scores, low_res = got
    t_masks, t_scores, t_low_res = want
    rows = [_error_row("decoder", image, case, "low_res_masks", low_res, t_low_res, tol),
            _error_row("decoder", image, case, "iou_predictions", scores, t_scores, tol)]
    ious = [mask_iou(m, t) for m, t in zip(masks, t_masks)] \
        if np.shape(masks) == np.shape(t_masks) else [0.0]
    worst = min(ious)
    rows.append(Row("decoder", image, case, "masks", "min mask IoU", worst, tol.min_mask_iou,
                    "pass" if worst >= tol.min_mask_iou else "FAIL"))
    return rows


def _recorded(path: Path) -> Dict:
    """What the exporter recorded in a graph (nothing for other tools' graphs)."""
    return metadata.read(readable(path))


def same_weights(path: Path, checksum: Optional[str]) -> None:
    """Graphs sam-onnx exported say which weights they hold: refuse a comparison with others."""
    recorded = _recorded(path).get("weights")
    if recorded and checksum and recorded != checksum:
        raise SamOnnxError(f"{path.name} was exported from weights {recorded}, not the {checksum} "
                           "given here; pass the checkpoint it was exported from")


def _same_model(path: Path, model_type: str) -> None:
    """Graphs sam-onnx exported say which model they are: refuse another --model at once."""
    recorded = _recorded(path).get("model_type")
    if recorded and recorded != model_type:
        raise SamOnnxError(f"{path.name} is a {recorded} graph, not {model_type}: pass "
                           f"--model {recorded}")


def _export(model_type, checkpoint, random_weights, out: Path, decoder_contract: str,
            precision: str) -> Tuple[Path, Path]:
    """Export fp32 graphs (and the reduced-precision variant asked for) to check."""
    result = export(model_type, checkpoint, random_weights=random_weights, out_dir=out,
                    decoder_contract=decoder_contract,
                    quantize="int8" if precision == "int8" else None)
    enc, dec = result.graph("encoder").path, result.graph("decoder").path
    if precision == "int8":
        return result.graph("encoder", "int8").path, result.graph("decoder", "int8").path
    if precision == "fp16":
        pair = []
        for path in (enc, dec):
            target = path.with_name(path.name[:-5] + ".fp16.onnx")
            repair(path, target, fp16=True)
            pair.append(target)
        return pair[0], pair[1]
    return enc, dec
