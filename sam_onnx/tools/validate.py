"""``sam_onnx.validate``: the graph layer's rules, and with ``run=True`` one real inference, its
ONNX Runtime error mapped to a rule, and a look at the outputs for NaN/Inf."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnx

from ..families.sam.contracts import IMAGE_SIZE
from ..graph import feeds as feeds_
from ..graph import signature
from ..graph import validate as validator
from ..graph.findings import Report
from ..runtime import transforms
from ..runtime.sessions import Session, SessionConfig, create

#: ONNX Runtime's messages and the rule each belongs to.
_ORT_ERRORS = (
    (re.compile(r"Required inputs .* are missing"), validator.MISSING_INPUT),
    (re.compile(r"Invalid input name"), validator.UNEXPECTED_INPUT),
    (re.compile(r"Unexpected input data type"), validator.DTYPE),
    (re.compile(r"Invalid rank for input"), validator.RANK),
    (re.compile(r"Got invalid dimensions for input"), validator.DIM),
    (re.compile(r"Unsupported model IR version"), validator.IR_TOO_NEW),
    (re.compile(r"opset"), validator.OPSET_TOO_NEW),
)


def synthesize(model: onnx.ModelProto, feed: Optional[feeds_.Feed]) -> dict:
    """Arrays to run with: the feed's own, else zeros of its described dtypes and shapes,
    else what the matching contract's wrapper builds, else zeros of the graph's inputs."""
    if feed is not None:
        return {n: e.array if e.array is not None else np.zeros(e.shape, e.dtype)
                for n, e in feed.items()}
    contract, problems = signature.nearest_contract(model)
    if not problems:
        return feeds_.example_arrays(contract)
    sizes = feeds_.SYMBOL_VALUES
    return {t.name: np.zeros([d if isinstance(d, int) else sizes.get(d, 1) for d in t.shape],
                             dtype=t.dtype)
            for t in signature.graph_inputs(model)}


def validate(model: validator.ModelSource, feed: Optional[feeds_.FeedSource] = None, *,
             run: bool = False) -> Report:
    """Validate one graph (a path or a ModelProto), optionally against a feed and by running it."""
    report = validator.validate(model, feed)
    if run and report.ok:
        if isinstance(model, onnx.ModelProto):
            source, proto, name = model, model, model.graph.name or "<model>"
        else:
            source, name = Path(model), str(model)
            proto = onnx.load(name, load_external_data=False)
        entries = None if feed is None else feeds_.load(feed)
        report.extend(run_once(source, proto, entries, name))
    return report


#: The image sizes the crop is checked at: one landscape and one portrait, neither the
#: 1500x2250 segment-anything's script exports with nor its transpose (a 2:3 landscape
#: shares that crop by chance).
CROP_CHECK_SIZES = ((600, 1400), (1400, 800))


def frozen_crop(source: Union[Path, onnx.ModelProto], model: onnx.ModelProto,
                session: Optional[Session] = None) -> Optional[str]:
    """Whether an official-form decoder's masks are cropped at a size frozen when it was
    exported: its ``masks`` are compared with its own ``low_res_masks`` upscaled, cropped and
    resized as segment-anything's postprocess_masks does, at a landscape and a portrait size.
    What differs, in words, or None (also for graphs without that form). ``session``: one
    already made for the graph; else one is made when the graph has that form."""
    inputs = {t.name for t in signature.graph_inputs(model)}
    outputs = [o.name for o in model.graph.output]
    if "orig_im_size" not in inputs or not {"masks", "low_res_masks"} <= set(outputs):
        return None
    arrays = synthesize(model, None)
    session = session or _cpu_session(source)
    wrong = []
    for h, w in CROP_CHECK_SIZES:
        arrays["orig_im_size"] = np.array([h, w], np.float32)
        got = dict(zip(session.output_names, session.run(None, arrays)))
        want = transforms.postprocess_masks(
            got["low_res_masks"], transforms.preprocess_shape(h, w, IMAGE_SIZE), (h, w),
            IMAGE_SIZE)
        if got["masks"].shape != want.shape or not np.allclose(
                got["masks"], want, atol=1e-3 + 1e-3 * float(np.abs(want).max())):
            wrong.append(f"{h}x{w}")
    if not wrong:
        return None
    checked = ", ".join(f"{h}x{w}" for h, w in CROP_CHECK_SIZES)
    return (f"masks are cropped at a size frozen when the graph was exported (wrong at "
            f"{' and '.join(wrong)}; checked at {checked}): exports through segment-anything "
            "1.0's SamOnnxModel (its script, samexporter) trace the crop as a constant, so "
            "masks are right only at the export's aspect ratio")


def run_once(source: Union[Path, onnx.ModelProto], model: onnx.ModelProto,
             feed: Optional[feeds_.Feed], name: str) -> Report:
    """One ONNX Runtime run, its error mapped to a rule, its outputs checked for NaN/Inf,
    then, on the same session, the frozen-crop check."""
    report = Report()
    arrays = synthesize(model, feed)
    try:
        session = _cpu_session(source)
        outputs = session.run(None, arrays)
    except Exception as exc:  # ONNX Runtime raises several types; map by message
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        rule = next((r for pattern, r in _ORT_ERRORS if pattern.search(text)),
                    validator.RUN_FAILED)
        report.add(rule.finding("model", f"ONNX Runtime refused to run: {text}",
                                "see the other findings for this rule's fix", ort_error=text,
                                model=name))
        return report
    for out_name, value in zip(session.output_names, outputs):
        bad = int(np.size(value) - np.isfinite(value).sum()) if np.issubdtype(
            np.asarray(value).dtype, np.floating) else 0
        if bad:
            report.add(validator.NON_FINITE.finding(
                f"output:{out_name}", f"{bad} NaN/Inf value(s) in {out_name} "
                f"{list(np.shape(value))}", "check the inputs' values and the export "
                "(e.g. fp16 overflow)", model=name))
    crop = frozen_crop(source, model, session) if report.ok else None
    if crop is not None:
        report.add(validator.FROZEN_CROP.finding(
            "output:masks", crop, validator.repair_command(name, "--auto --feed official"),
            model=name))
    return report


def _cpu_session(source: Union[Path, onnx.ModelProto]) -> Session:
    data = source if isinstance(source, Path) else source.SerializeToString()
    return create(data, SessionConfig(providers=("cpu",)))
