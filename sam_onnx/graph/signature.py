"""Read what a graph takes and returns as TensorSpecs, from the protobuf alone."""
from __future__ import annotations

from typing import List, Tuple

import onnx
from onnx import helper

from ..core.contracts import GraphContract, TensorSpec
from ..families import CONTRACTS


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
    except (KeyError, ValueError, TypeError):  # undefined or not a numpy type (e.g. bfloat16)
        dtype = onnx.TensorProto.DataType.Name(t.elem_type) if t.elem_type in \
            onnx.TensorProto.DataType.values() else "undefined"
    shape = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim
    )
    return TensorSpec(value.name, dtype, shape, value.doc_string)


def graph_inputs(model: onnx.ModelProto) -> Tuple[TensorSpec, ...]:
    """Inputs a caller must feed: initializers listed as inputs by old exporters are left out."""
    init = {i.name for i in model.graph.initializer}
    return tuple(_spec(v) for v in model.graph.input if v.name not in init)


def graph_outputs(model: onnx.ModelProto) -> Tuple[TensorSpec, ...]:
    return tuple(_spec(v) for v in model.graph.output)


def mismatches(model: onnx.ModelProto, contract: GraphContract) -> List[str]:
    """How the graph's inputs and outputs differ from ``contract`` (names, dtypes, shapes)."""
    problems = []
    for kind, actual, declared in (("input", graph_inputs(model), contract.inputs),
                                   ("output", graph_outputs(model), contract.outputs)):
        got = {t.name: t for t in actual}
        want = {t.name: t for t in declared}
        problems += [f"missing {kind} {n}" for n in want if n not in got]
        problems += [f"unexpected {kind} {n}" for n in got if n not in want]
        for name in want.keys() & got.keys():
            w, g = want[name], got[name]
            if w.dtype != g.dtype:
                problems.append(f"{kind} {name} is {g.dtype}, declared {w.dtype}")
            # a symbolic dim (often one an exporter named, e.g. Clipmasks_dim_0) takes the
            # declared size at run time: only two different fixed sizes disagree
            if len(w.shape) != len(g.shape) or any(
                isinstance(wd, int) and isinstance(gd, int) and wd != gd
                for wd, gd in zip(w.shape, g.shape)
            ):
                problems.append(f"{kind} {name} has shape {list(g.shape)}, "
                                f"declared {list(w.shape)}")
            elif any(isinstance(wd, str) and isinstance(gd, int)
                     for wd, gd in zip(w.shape, g.shape)):
                problems.append(f"{kind} {name} has static shape {list(g.shape)}, declared "
                                f"dynamic {list(w.shape)}")
    return problems


def subgraphs(node: onnx.NodeProto) -> List[onnx.GraphProto]:
    """The bodies of If/Loop/Scan nodes."""
    return [g for attr in node.attribute
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def consumed_names(graph: onnx.GraphProto) -> set:
    """Every tensor name a node reads, subgraphs included."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for sub in subgraphs(node):
            names |= consumed_names(sub)
    return names


def nearest_contract(model: onnx.ModelProto) -> Tuple[GraphContract, List[str]]:
    """The declared contract the graph is closest to, and how it differs (empty: it matches)."""
    scored = [(mismatches(model, c), c) for c in CONTRACTS.values()]
    problems, contract = min(scored, key=lambda pc: len(pc[0]))
    return contract, problems
