"""What ``repair --auto --feed CONTRACT`` does to a graph, decided from its protobuf alone:
the passes (``graph.passes``) that make it take that contract's feed. validate suggests the
command only where the plan, applied to a copy, gives a graph that takes the feed
(``validate.repairable``)."""
from __future__ import annotations

import difflib
from typing import Dict

import onnx

from ..backend import runtime_limits
from ..core.errors import SamOnnxError
from ..families import CONTRACTS
from . import io as graph_io
from . import passes, signature

#: (the feed's contract, the graph's inputs) -> the conversion that makes it take the feed.
CONVERSIONS = {("official", frozenset(CONTRACTS["lowres"].input_names)): "official",
               ("lowres", frozenset(CONTRACTS["official"].input_names)): "lowres",
               ("batched", frozenset(passes.UNFILTERED_BATCHED_INPUTS)): "batched"}
#: (the feed's contract, another tool's form the graph matches whole) -> the conversion; its
#: names are the conversion's to change, not renames to guess.
FROM_FORMS = {("sam2_official", "sam2_ort_multimask"): "sam2_official"}


def auto(model: onnx.ModelProto, feed: str) -> dict:
    """The repair options that make ``model`` accept the ``feed`` contract's inputs."""
    if feed not in CONTRACTS:
        raise SamOnnxError(f"--auto --feed {feed}: name a contract ({', '.join(CONTRACTS)})")
    plan = _version_plan(model)
    if any(v.name in {i.name for i in model.graph.initializer} for v in model.graph.input):
        plan["drop_initializer_inputs"] = True
    form, problems = signature.nearest_contract(model)
    if not problems and (feed, form.name) in FROM_FORMS:
        plan["contract"] = FROM_FORMS[feed, form.name]
        return plan
    renames = _renames(model, CONTRACTS[feed])
    if renames:
        plan["rename"] = renames
    current = frozenset(renames.get(t.name, t.name) for t in signature.graph_inputs(model))
    if (feed, current) in CONVERSIONS:
        plan["contract"] = CONVERSIONS[feed, current]
    if _points_fixed(model, renames):
        plan["dynamic_points"] = True
    return plan


def _version_plan(model: onnx.ModelProto) -> dict:
    """Down to the IR version and opset this ONNX Runtime loads."""
    plan = {}
    max_ir, max_opset = runtime_limits()
    if model.ir_version > max_ir:
        plan["ir_version"] = max_ir
    if graph_io.opset(model) > max_opset:
        plan["opset"] = max_opset
    return plan


def _renames(model: onnx.ModelProto, target) -> Dict[str, str]:
    """Inputs and outputs whose names are close to one the contract (or its decoder
    counterpart) uses and the graph lacks."""
    names = [t.name for t in signature.graph_inputs(model)] + [o.name for o in model.graph.output]
    wanted = list(target.input_names) + list(target.output_names)
    if target.role == "decoder":
        other = CONTRACTS["lowres" if target.name == "official" else "official"]
        wanted += list(other.output_names)
    renames = {}
    for name in names:
        if name not in wanted:
            near = difflib.get_close_matches(name, [w for w in wanted if w not in names], n=1,
                                             cutoff=0.75)
            if near:
                renames[name] = near[0]
    return renames


def _points_fixed(model: onnx.ModelProto, renames: Dict[str, str]) -> bool:
    """Whether a point input has a fixed point axis, or a fixed prompt axis other than 1."""
    for value in model.graph.input:
        if renames.get(value.name, value.name) in passes.POINT_INPUTS:
            dim = value.type.tensor_type.shape.dim
            fixed_prompts = dim and dim[0].HasField("dim_value") and dim[0].dim_value != 1
            if len(dim) > 1 and (dim[1].HasField("dim_value") or fixed_prompts):
                return True
    return False
