"""``sam_onnx.repair``: apply named passes to a graph, then prove the result.

The result is written through a staging folder (never over the input unless ``in_place``,
which first keeps a ``.bak``, never overwriting an earlier one), validated, run in ONNX
Runtime, and, where every pass applied should keep the function, compared with the
original's outputs on the same feed.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import onnx

from ..core.contracts import EVERY_PROMPT
from ..core.errors import SamOnnxError
from ..core.files import Staging, has_external_data, locked, part_file
from ..core.parity import ParityReport
from ..core.parity import report as parity_report
from ..families import CONTRACTS
from ..graph import metadata, passes, plan, signature
from ..graph import validate as validator
from ..graph.findings import Report
from ..graph.io import PROTOBUF_LIMIT
from ..runtime import sessions
from ..runtime.sessions import SessionConfig
from .validate import frozen_crop, synthesize, validate


@dataclass
class RepairResult:
    output: Path
    changes: List[str] = field(default_factory=list)
    report: Report = field(default_factory=Report)
    parity: Optional[ParityReport] = None
    backups: List[Path] = field(default_factory=list)  # --in-place: the input's copies


def repair(src, dst=None, *, rename: Optional[Dict[str, str]] = None,
           dynamic_points: bool = False, drop_initializer_inputs: bool = False,
           ir_version: Optional[int] = None, opset: Optional[int] = None,
           external_data: Optional[bool] = None, simplify: bool = False, fp16: bool = False,
           contract: Optional[str] = None, fix_crop: bool = False,
           auto_feed: Optional[str] = None, in_place: bool = False) -> RepairResult:
    """Repair ``src`` into ``dst``; see the module docstring. ``auto_feed`` picks the passes
    that make the graph take that contract's feed."""
    src, dst = _paths(src, dst, in_place)
    if contract is not None and contract not in passes.CONTRACT_CONVERSIONS:
        raise SamOnnxError(f"--contract {contract}: use "
                           f"{', '.join(passes.CONTRACT_CONVERSIONS)}")
    original = validator.readable(src)
    model = onnx.load(str(src))  # with its weights: passes may rewrite them
    options = dict(rename=rename or {}, dynamic_points=dynamic_points,
                   drop_initializer_inputs=drop_initializer_inputs, ir_version=ir_version,
                   opset=opset, simplify=simplify, fp16=fp16, contract=contract,
                   fix_crop=fix_crop)
    if auto_feed:
        options = _with_plan(options, plan.auto(model, auto_feed))
        if frozen_crop(src, original) is not None:
            options["fix_crop"] = True
    model, changes, applied = passes.apply(model, options)
    keep_external = _external_data(model, src, dst, external_data, changes)
    if not changes:
        raise SamOnnxError("nothing to repair: name a fix (see sam-onnx repair --help) or "
                           "--auto --feed CONTRACT")
    _restamp(model, changes)
    precision = "fp16" if any(p.precision == "fp16" for p in applied) else "fp32"
    recomputed = {name for p in applied for name in p.recomputes}
    renames = {**options["rename"], **{k: v for p in applied for k, v in p.renames.items()}}
    result = _write_checked(model, src, original, dst, keep_external, auto_feed, changes,
                            renames, precision, recomputed, in_place)
    result.report = Report([f.__class__(**{**f.to_dict(), "model": str(dst)})
                            for f in result.report.findings])
    return result


def _paths(src, dst, in_place: bool) -> Tuple[Path, Path]:
    src = Path(src)
    if dst is None and not in_place:
        raise SamOnnxError("name the output: -o OUT.onnx (or --in-place, which keeps a backup)")
    dst = src if in_place else Path(dst)
    if dst.resolve() == src.resolve() and not in_place:
        raise SamOnnxError(f"-o {dst} is the input; pass --in-place to overwrite it (a .bak "
                           "copy is kept)")
    return src, dst


def _with_plan(options: Dict, plan: Dict) -> Dict:
    """The options asked for, completed by what ``--auto`` found (what was asked wins)."""
    merged = {k: options[k] or plan.get(k, options[k]) for k in options}
    merged["rename"] = {**plan.get("rename", {}), **options["rename"]}
    return merged


def _external_data(model: onnx.ModelProto, src: Path, dst: Path,
                   external_data: Optional[bool], changes: List[str]) -> bool:
    """Whether the result keeps its weights in a .data file: as asked, else as the input did
    (or must, over 2 GB)."""
    big = model.ByteSize() > PROTOBUF_LIMIT
    if external_data is False and big:
        raise SamOnnxError("this graph is over 2 GB: it must keep its weights in external data")
    if external_data is not None and external_data != has_external_data(src):
        changes.append("external_data: weights moved to " + (
            f"{dst.name}.data" if external_data else "the graph file"))
    return external_data if external_data is not None else (big or has_external_data(src))


def _write_checked(model, src: Path, original, dst: Path, keep_external: bool,
                   auto_feed: Optional[str], changes: List[str], renames: Dict[str, str],
                   precision: str, recomputed: Set[str], in_place: bool) -> RepairResult:
    """Stage the result, validate and run it, compare it with the original, then publish it
    (the input backed up first when it is replaced)."""
    with Staging(dst.parent) as staging:
        staged = staging.path(dst.name)
        if keep_external:
            onnx.save(model, str(staged), save_as_external_data=True,
                      all_tensors_to_one_file=True, location=dst.name + ".data")
        else:
            onnx.save(model, str(staged))
        result = RepairResult(dst, changes)
        result.report = validate(staged, feed=auto_feed, run=True)
        if not result.report.ok:
            first = result.report.errors[0]
            raise SamOnnxError(f"the repaired graph still fails {first.code} {first.name}: "
                               f"{first.message}; nothing was written")
        result.parity = _compare(src, original, staged, renames, precision, recomputed)
        if result.parity is None:
            changes.append("outputs not compared: this ONNX Runtime cannot run the original")
        elif not result.parity.passed:
            w = result.parity.worst
            raise SamOnnxError(f"the repaired graph's {w.output} differs from the "
                               f"original's: {w.describe()}; nothing was written")
        if in_place:
            result.backups = _back_up([src, *src.parent.glob(src.name + ".data")])
        staging.commit(p.name for p in staging.dir.iterdir())
    return result


def _back_up(paths: List[Path]) -> List[Path]:
    """Copy each file to ``NAME.bak``, or to ``NAME.bak.N`` with the first N whose names are
    all free: a backup is never overwritten (a second --in-place repair keeps the first one's
    backup of the original). The folder is locked while the names are chosen."""
    folder = paths[0].parent
    with locked(folder):
        n = 0
        while any(p.with_name(p.name + _bak(n)).exists() for p in paths):
            n += 1
        backups = [p.with_name(p.name + _bak(n)) for p in paths]
        for path, backup in zip(paths, backups):
            with part_file(backup) as tmp:
                shutil.copy2(path, tmp)
    return backups


def _bak(n: int) -> str:
    return ".bak" if n == 0 else f".bak.{n}"


def _restamp(model: onnx.ModelProto, changes: List[str]) -> None:
    """Record the contract the repaired graph now follows (or none), and what was changed."""
    record = metadata.read(model)
    match, problems = signature.nearest_contract(model)
    record.pop("contract", None)
    record.pop("contract_spec", None)
    if not problems:
        record.update(role=match.role, contract=match.name, contract_spec=match.to_dict())
    record["repairs"] = changes
    metadata.write(model, record)


def _selected(outputs: Dict[str, np.ndarray], num_points: int) -> Dict[str, np.ndarray]:
    """segment-anything's select_masks on a four-mask decoder's outputs (see
    families.sam.contracts.SELECT_MASKS)."""
    score = outputs["iou_predictions"][0].astype(np.float64)
    score[0] += (num_points - 2.5) * 1000
    best = int(np.argmax(score))
    return {k: v[:, best:best + 1] for k, v in outputs.items()}


def _compare(src: Path, original: onnx.ModelProto, repaired: Path, renames: Dict[str, str],
             precision: str, recomputed: Set[str]) -> Optional[ParityReport]:
    """Run both graphs on one feed and compare the outputs they share (by renamed name),
    less those a pass ``recomputed`` on purpose."""
    base = synthesize(original, None)
    new_model = onnx.load(str(repaired), load_external_data=False)
    arrays = {renames.get(k) or k: v for k, v in base.items()}
    mask = arrays.get("mask_input")
    defaults = {"has_mask_input": np.array([float(mask is not None and np.any(mask))], np.float32),
                "orig_im_size": np.array([1024.0, 1024.0], np.float32),
                "pred_iou_thresh": np.array([EVERY_PROMPT], np.float32)}
    feed_new = {t.name: np.asarray(arrays.get(t.name, defaults.get(t.name)), t.dtype)
                for t in signature.graph_inputs(new_model)}  # a cast input: its new dtype
    cpu = SessionConfig(providers=("cpu",))
    try:
        old = sessions.create(src, cpu)
    except Exception:  # e.g. the IR version this repair lowered
        return None
    new = sessions.create(repaired, cpu)
    old_out = {renames.get(n, n): v for n, v in zip(old.output_names, old.run(None, base))
               if renames.get(n, n) is not None}  # None: an output the repair dropped
    new_out = dict(zip(new.output_names, new.run(None, feed_new)))
    shared = {k: v for k, v in old_out.items() if k in new_out and k not in recomputed}
    if "iou_predictions" in shared and \
            shared["iou_predictions"].shape != new_out["iou_predictions"].shape:
        # four masks against one: the one must be the mask select_masks picks of the four
        n = arrays["point_coords"].shape[1]
        if shared["iou_predictions"].shape[1] > 1:
            shared = _selected(shared, n)
        else:
            new_out = _selected(new_out, n)
    contract = CONTRACTS.get(metadata.read(original).get("contract", ""), CONTRACTS["official"])
    tolerance = contract.tolerances.get(precision, contract.tolerances["fp32"])
    return parity_report(repaired.name, precision, tolerance, {"synthesized": (new_out, shared)})
