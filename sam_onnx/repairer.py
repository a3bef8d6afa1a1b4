"""``sam_onnx.repair``: apply named passes to a graph, then prove the result.

The result is written through a staging folder (never over the input unless ``in_place``,
which keeps a ``.bak``), validated, run in ONNX Runtime, and, where every pass applied
should keep the function, compared with the original's outputs on the same feed.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx

from . import repair_passes as passes
from . import metadata, sessions, signature, validator
from .contracts import CONTRACTS, EVERY_PROMPT
from .errors import SamOnnxError
from .exporter import PROTOBUF_LIMIT
from .findings import Report
from .parity import ParityReport, report as parity_report
from .run_check import synthesize
from .sessions import SessionConfig
from .staging import Staging, has_external_data


@dataclass
class RepairResult:
    output: Path
    changes: List[str] = field(default_factory=list)
    report: Report = field(default_factory=Report)
    parity: Optional[ParityReport] = None


def repair(src, dst=None, *, rename: Optional[Dict[str, str]] = None,
           dynamic_points: bool = False, drop_initializer_inputs: bool = False,
           ir_version: Optional[int] = None, opset: Optional[int] = None,
           external_data: Optional[bool] = None, simplify: bool = False, fp16: bool = False,
           contract: Optional[str] = None, auto_feed: Optional[str] = None,
           in_place: bool = False) -> RepairResult:
    """Repair ``src`` into ``dst``; see the module docstring. ``auto_feed`` picks the passes
    that make the graph take that contract's feed."""
    src = Path(src)
    if dst is None and not in_place:
        raise SamOnnxError("name the output: -o OUT.onnx (or --in-place, which keeps a backup)")
    dst = src if in_place else Path(dst)
    if dst.resolve() == src.resolve() and not in_place:
        raise SamOnnxError(f"-o {dst} is the input; pass --in-place to overwrite it (a .bak "
                           "copy is kept)")
    unreadable = Report()
    original = validator.read(src, unreadable)
    if original is None:
        raise SamOnnxError(unreadable.findings[0].message)
    model = onnx.load(str(src))  # with its weights: passes may rewrite them
    if auto_feed:
        if auto_feed not in CONTRACTS:
            raise SamOnnxError(f"--auto --feed {auto_feed}: name a contract "
                               f"({', '.join(CONTRACTS)})")
        plan = _auto_plan(model, auto_feed)
        rename, dynamic_points = {**plan.get("rename", {}), **(rename or {})}, \
            dynamic_points or plan.get("dynamic_points", False)
        drop_initializer_inputs = drop_initializer_inputs or plan.get("drop", False)
        ir_version, opset = ir_version or plan.get("ir_version"), opset or plan.get("opset")
        contract = contract or plan.get("contract")
    changes: List[str] = []
    applied = []

    def note(name, done):
        if done:
            applied.append(name)
            changes.extend(f"{name}: {d}" for d in done)

    if drop_initializer_inputs:
        note("drop_initializer_inputs", passes.drop_initializer_inputs(model))
    if rename:
        note("rename", passes.rename(model, rename))
    if dynamic_points:
        note("dynamic_points", passes.dynamic_points(model))
    if contract == "official":
        note("to_official", passes.to_official(model))
    elif contract == "lowres":
        note("to_lowres", passes.to_lowres(model))
    elif contract == "batched":
        note("to_batched", passes.to_batched(model))
    elif contract is not None:
        raise SamOnnxError(f"--contract {contract}: use official, lowres or batched")
    if opset is not None:
        before = _opset(model)
        if before != opset:
            model = passes.convert_opset(model, opset)
            note("opset", [f"opset {before} -> {opset}"])
    if ir_version is not None:
        note("ir_version", passes.set_ir_version(model, ir_version))
    if simplify:
        import onnxsim

        model, ok = onnxsim.simplify(model)
        if not ok:
            raise SamOnnxError("onnxsim could not verify the simplified graph; repair without "
                               "--simplify")
        note("simplify", ["simplified with onnxsim"])
    if fp16:
        model = passes.fp16(model)
        note("fp16", ["weights and compute in float16, inputs and outputs float32"])
    big = model.ByteSize() > PROTOBUF_LIMIT if external_data is None else None
    keep_external = external_data if external_data is not None else (
        big or has_external_data(src))
    if external_data is False and model.ByteSize() > PROTOBUF_LIMIT:
        raise SamOnnxError("this graph is over 2 GB: it must keep its weights in external data")
    if external_data is not None and external_data != has_external_data(src):
        note("external_data", ["weights moved to " + (f"{dst.name}.data" if external_data
                                                      else "the graph file")])
    if not changes:
        raise SamOnnxError("nothing to repair: name a fix (see sam-onnx repair --help) or "
                           "--auto --feed CONTRACT")

    _restamp(model, changes)
    with Staging(dst.parent) as staging:
        staged = staging.path(dst.name)
        if keep_external:
            onnx.save(model, str(staged), save_as_external_data=True,
                      all_tensors_to_one_file=True, location=dst.name + ".data")
        else:
            onnx.save(model, str(staged))
        result = RepairResult(dst, changes)
        result.report = validator.validate(staged, feed=auto_feed, run=True)
        if not result.report.ok:
            first = result.report.errors[0]
            raise SamOnnxError(f"the repaired graph still fails {first.code} {first.name}: "
                               f"{first.message}; nothing was written")
        if set(applied) <= passes.PRESERVES_FUNCTION | {"fp16"}:
            result.parity = _compare(src, original, staged, rename or {},
                                     "fp16" if "fp16" in applied else "fp32")
            if result.parity is None:
                changes.append("outputs not compared: this ONNX Runtime cannot run the original")
            elif not result.parity.passed:
                w = result.parity.worst
                raise SamOnnxError(f"the repaired graph's {w.output} differs from the "
                                   f"original's: {w.describe()}; nothing was written")
        if in_place:
            for path in [src, *src.parent.glob(src.name + ".data")]:
                shutil.copy2(path, path.with_name(path.name + ".bak"))
        staging.commit(p.name for p in staging.dir.iterdir())
    result.report = Report([f.__class__(**{**f.to_dict(), "model": str(dst)})
                            for f in result.report.findings])
    return result


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


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _auto_plan(model: onnx.ModelProto, feed: str) -> dict:
    """The passes that make ``model`` accept the ``feed`` contract's inputs."""
    import difflib

    target = CONTRACTS[feed]
    plan: dict = {}
    max_ir, max_opset = validator.runtime_limits()
    if model.ir_version > max_ir:
        plan["ir_version"] = max_ir
    if _opset(model) > max_opset:
        plan["opset"] = max_opset
    init = {i.name for i in model.graph.initializer}
    if any(v.name in init for v in model.graph.input):
        plan["drop"] = True
    names = [t.name for t in signature.graph_inputs(model)] + [o.name for o in model.graph.output]
    wanted = list(target.input_names) + list(target.output_names)
    if target.role == "decoder":
        lowres, official = CONTRACTS["lowres"], CONTRACTS["official"]
        wanted += list(lowres.output_names if feed == "official" else official.output_names)
    renames = {}
    for name in names:
        if name not in wanted:
            near = difflib.get_close_matches(name, [w for w in wanted if w not in names], n=1,
                                             cutoff=0.75)
            if near:
                renames[name] = near[0]
    if renames:
        plan["rename"] = renames
    current = {renames.get(t.name, t.name) for t in signature.graph_inputs(model)}
    if feed == "official" and current == set(CONTRACTS["lowres"].input_names):
        plan["contract"] = "official"
    elif feed == "lowres" and current == set(CONTRACTS["official"].input_names):
        plan["contract"] = "lowres"
    elif feed == "batched" and current == passes.UNFILTERED_BATCHED_INPUTS:
        plan["contract"] = "batched"
    for value in model.graph.input:
        if renames.get(value.name, value.name) in passes.POINT_INPUTS:
            dim = value.type.tensor_type.shape.dim
            fixed_prompts = dim and dim[0].HasField("dim_value") and dim[0].dim_value != 1
            if len(dim) > 1 and (dim[1].HasField("dim_value") or fixed_prompts):
                plan["dynamic_points"] = True
    return plan


def _compare(src: Path, original: onnx.ModelProto, repaired: Path, renames: Dict[str, str],
             precision: str) -> Optional[ParityReport]:
    """Run both graphs on one feed and compare the outputs they share (by renamed name)."""
    base = synthesize(original, None)
    new_model = onnx.load(str(repaired), load_external_data=False)
    arrays = {renames.get(k, k): v for k, v in base.items()}
    mask = arrays.get("mask_input")
    defaults = {"has_mask_input": np.array([float(mask is not None and np.any(mask))], np.float32),
                "orig_im_size": np.array([1024.0, 1024.0], np.float32),
                "pred_iou_thresh": np.array([EVERY_PROMPT], np.float32)}
    feed_new = {t.name: arrays.get(t.name, defaults.get(t.name))
                for t in signature.graph_inputs(new_model)}
    cpu = SessionConfig(providers=("cpu",))
    try:
        old = sessions.create(src, cpu)
    except Exception:  # e.g. the IR version this repair lowered
        return None
    new = sessions.create(repaired, cpu)
    old_out = {renames.get(n, n): v for n, v in zip(old.output_names, old.run(None, base))}
    new_out = dict(zip(new.output_names, new.run(None, feed_new)))
    shared = {k: v for k, v in old_out.items() if k in new_out}
    contract = CONTRACTS.get(metadata.read(original).get("contract", ""), CONTRACTS["official"])
    tolerance = contract.tolerances.get(precision, contract.tolerances["fp32"])
    return parity_report(repaired.name, precision, tolerance, {"synthesized": (new_out, shared)})
