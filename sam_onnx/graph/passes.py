"""Graph-to-graph repair passes, and their registry ``PASSES`` (name -> pass, the tolerance its
result is compared with the original at), which ``repair`` applies in order.

Each edit returns what it changed (an empty list: nothing to do). Also here: the cuts the
runtime makes to a graph it loads (``keep_outputs``, ``bind_inputs``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..core.errors import SamOnnxError
from ..families.sam.contracts import (
    DECODER_BATCHED,
    DECODER_LOWRES,
    DECODER_OFFICIAL,
    DECODER_OFFICIAL_SINGLE,
    IMAGE_SIZE,
    NUM_MASK_TOKENS,
)
from ..families.sam2.contracts import ALIASES as SAM2_ALIASES
from ..families.sam2.contracts import SAM2_OFFICIAL, SAM2_ORT, SAM2_ORT_MULTIMASK
from . import io as graph_io
from . import signature

POINT_INPUTS = ("point_coords", "point_labels")
#: A many-prompt decoder that returns every prompt's masks: the batched contract before it
#: took pred_iou_thresh, and what other tools export.
UNFILTERED_BATCHED_INPUTS = set(DECODER_BATCHED.input_names) - {"pred_iou_thresh"}


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
        for sub in signature.subgraphs(node):
            _rename_everywhere(sub, old, new)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def rename(model: onnx.ModelProto, mapping: Dict[str, str]) -> List[str]:
    """Rename graph inputs/outputs: ``{"images": "image"}``."""
    io = [v.name for v in list(model.graph.input) + list(model.graph.output)]
    changes = []
    for old, new in mapping.items():
        if old not in io:
            raise SamOnnxError(f"--rename {old}={new}: the graph has no input or output {old}; "
                               f"it has {', '.join(io)}")
        if new in io:
            raise SamOnnxError(f"--rename {old}={new}: {new} already exists in the graph")
        _rename_everywhere(model.graph, old, new)
        changes.append(f"renamed {old} to {new}")
    return changes


def dynamic_points(model: onnx.ModelProto) -> List[str]:
    """Make the point axis of point_coords/point_labels the symbolic ``num_points``, and a
    fixed prompt axis other than 1 (a batched decoder exported for one batch size) the
    symbolic ``num_prompts``."""
    changes = []
    for value in model.graph.input:
        if value.name not in POINT_INPUTS:
            continue
        dims = value.type.tensor_type.shape.dim
        wanted = {1: "num_points"}
        if dims[0].HasField("dim_value") and dims[0].dim_value != 1:
            wanted[0] = "num_prompts"
        for axis, symbol in wanted.items():
            dim = dims[axis]
            if not dim.HasField("dim_param") or dim.dim_param != symbol:
                before = dim.dim_value if dim.HasField("dim_value") else dim.dim_param
                dim.Clear()
                dim.dim_param = symbol
                changes.append(f"{value.name} axis {axis}: {before} -> {symbol}")
    if changes:  # inferred shapes inside the graph may still say the old size
        del model.graph.value_info[:]
    return changes


def drop_initializer_inputs(model: onnx.ModelProto) -> List[str]:
    init = {i.name for i in model.graph.initializer}
    dropped = [v.name for v in model.graph.input if v.name in init]
    kept = [v for v in model.graph.input if v.name not in init]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return [f"dropped {len(dropped)} initializer(s) listed as inputs"] if dropped else []


def _min_ir_for_opset(opset: int) -> int:
    return min(ir for _, ir, ops, *_ in helper.VERSION_TABLE if ops >= opset)


def set_ir_version(model: onnx.ModelProto, ir: int) -> List[str]:
    if model.ir_version <= ir:
        return []
    opset = graph_io.opset(model) or 1
    if ir < _min_ir_for_opset(opset):
        raise SamOnnxError(f"IR version {ir} cannot hold opset {opset} (needs IR "
                           f"{_min_ir_for_opset(opset)}); lower the opset too: --opset N")
    before, model.ir_version = model.ir_version, ir
    return [f"IR version {before} -> {ir}"]


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx's version converter; returns the converted model (it builds a new one)."""
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:
        raise SamOnnxError(f"onnx cannot convert this graph to opset {opset}: "
                           f"{str(exc).splitlines()[0]}; export it again with --opset "
                           f"{opset}") from None


#: Names to_lowres and to_single give what they compute, so that to_official can undo them.
_HAS_MASK = "sam_onnx_has_mask"
_ALL = {"masks": "sam_onnx_all_masks", "iou_predictions": "sam_onnx_all_iou",
        "low_res_masks": "sam_onnx_all_low_res"}


def to_official(model: onnx.ModelProto) -> List[str]:
    """A decoder becomes the 6-input ``official`` one returning all four masks.

    From ``lowres``: has_mask_input gates mask_input (or, where to_lowres computed it from
    mask_input, becomes an input again), and the low-res logits are upscaled to orig_im_size
    inside the graph (``_upscale_nodes``). From a single-mask decoder that to_single made:
    the selection is removed."""
    g = model.graph
    names = {v.name for v in g.input}
    if names == set(DECODER_OFFICIAL.input_names):
        return _unselect(model)
    if names != set(DECODER_LOWRES.input_names):
        raise SamOnnxError("only a lowres decoder (image_embeddings, point_coords, point_labels, "
                           "mask_input) can be adapted to the official contract")
    if {"low_res_masks", "iou_predictions"} - {o.name for o in g.output}:
        raise SamOnnxError("the decoder's outputs must be named low_res_masks and "
                           "iou_predictions first: --rename OLD=low_res_masks")
    has_mask = helper.make_tensor_value_info("has_mask_input", TensorProto.FLOAT, [1])
    size = helper.make_tensor_value_info("orig_im_size", TensorProto.FLOAT, [2])
    if any(_HAS_MASK in node.output for node in g.node):  # to_lowres's: the original gate
        _remove_nodes(g, lambda node: node.output[0] in _LOWRES_PROLOGUE)
        _rename_everywhere(g, _HAS_MASK, "has_mask_input")
        done = "has_mask_input an input again (it was computed from mask_input)"
    else:
        _rename_everywhere(g, "mask_input", "mask_input_gated")
        for v in g.input:  # the graph input keeps its public name
            if v.name == "mask_input_gated":
                v.name = "mask_input"
        g.node.insert(0, helper.make_node("Mul", ["mask_input", "has_mask_input"],
                                          ["mask_input_gated"]))
        done = "added has_mask_input (gates mask_input)"
    g.input.extend([has_mask, size])
    g.node.extend(_upscale_nodes(g, "low_res_masks", "masks"))
    outputs = {o.name: o for o in g.output}
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("masks", TensorProto.FLOAT,
                                                   list(DECODER_OFFICIAL.outputs[0].shape)),
                     outputs["iou_predictions"], outputs["low_res_masks"]])
    _prune(g)
    return [f"{done} and orig_im_size", "added upscale-and-crop to orig_im_size: output masks"]


#: What to_sam2_official names differently: ONNX Runtime's inputs by samexporter's names, its
#: low-res logits as ``masks``; ``None``: its full-size bool masks, dropped.
SAM2_ORT_NAMES = {**{k: v for k, v in SAM2_ALIASES.items() if k != "original_image_size"},
                  "masks": None, "low_res_masks": "masks"}


def to_sam2_official(model: onnx.ModelProto) -> List[str]:
    """ONNX Runtime's SAM 2 decoder written with its three multimask outputs
    (``sam2_ort_multimask``) becomes samexporter's seven-input ``sam2_official``, the form
    X-AnyLabeling loads: samexporter's input names, float32 labels (cast to the int32 the
    graph computes with), no original_image_size, and its clipped low-res logits as
    ``masks`` instead of the full-size bool masks. ONNX Runtime's default decoder, one
    stability-chosen mask a prompt, has no three masks to return: refused."""
    g = model.graph
    names = {v.name for v in g.input}
    if names == set(SAM2_ORT.input_names) and \
            signature.nearest_contract(model)[0].name == SAM2_ORT.name:
        raise SamOnnxError("this ONNX Runtime SAM 2 decoder returns one mask a prompt, "
                           "sam2_official three: export ONNX Runtime's decoder with "
                           "--multimask_output, or sam2_official with sam-onnx export")
    if names != set(SAM2_ORT_MULTIMASK.input_names):
        raise SamOnnxError("only ONNX Runtime's SAM 2 decoder (sam2_ort_multimask) can be "
                           "converted to the sam2_official contract")
    _keep_outputs(g, ["low_res_masks", "iou_predictions"])  # the full-size masks go...
    if "original_image_size" in signature.consumed_names(g):
        raise SamOnnxError("this decoder reads original_image_size for more than resizing its "
                           "masks; it cannot become sam2_official")
    kept = [v for v in g.input if v.name != "original_image_size"]  # ...and what sized them
    del g.input[:]
    g.input.extend(kept)
    for old, new in SAM2_ORT_NAMES.items():
        if new is not None:
            _rename_everywhere(g, old, new)
    labels = "sam_onnx_point_labels_int32"
    _rename_everywhere(g, "point_labels", labels)
    for v in g.input:  # the input keeps its name, as float32; the graph reads the cast
        if v.name == labels:
            v.name = "point_labels"
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    g.node.insert(0, helper.make_node("Cast", ["point_labels"], [labels], to=TensorProto.INT32))
    order = {n: i for i, n in enumerate(SAM2_OFFICIAL.input_names)}
    inputs = sorted(g.input, key=lambda v: order[v.name])
    del g.input[:]
    g.input.extend(inputs)
    outputs = sorted(g.output, key=lambda v: SAM2_OFFICIAL.output_names.index(v.name))
    del g.output[:]
    g.output.extend(outputs)
    return ["inputs renamed as samexporter's, point_labels float32 (cast to int32 inside)",
            "dropped original_image_size and the full-size bool masks: masks are the clipped "
            "low-res logits"]


def _upscale_nodes(g: onnx.GraphProto, low_res: str, out: str) -> List[onnx.NodeProto]:
    """segment-anything's mask_postprocessing as nodes, for any image size: ``low_res``
    logits (B, C, 256, 256) upscaled to 1024, cropped to the image resized so its longest
    side is 1024 (rounded as ResizeLongestSide), resized to orig_im_size: ``out``."""
    p = f"sam_onnx_{out}_"
    g.initializer.extend([
        helper.make_tensor(p + "square", TensorProto.INT64, [2], [IMAGE_SIZE, IMAGE_SIZE]),
        helper.make_tensor(p + "image_size", TensorProto.FLOAT, [1], [float(IMAGE_SIZE)]),
        helper.make_tensor(p + "half", TensorProto.FLOAT, [1], [0.5]),
        helper.make_tensor(p + "zeros2", TensorProto.INT64, [2], [0, 0]),
        helper.make_tensor(p + "axes23", TensorProto.INT64, [2], [2, 3]),
        helper.make_tensor(p + "start", TensorProto.INT64, [1], [0]),
        helper.make_tensor(p + "end", TensorProto.INT64, [1], [2]),
    ])
    n = helper.make_node
    return [
        n("Shape", [low_res], [p + "shape"]),
        n("Slice", [p + "shape", p + "start", p + "end"], [p + "bc"]),
        n("Concat", [p + "bc", p + "square"], [p + "full"], axis=0),
        n("Resize", [low_res, "", "", p + "full"], [p + "up"], mode="linear",
          coordinate_transformation_mode="pytorch_half_pixel"),
        n("ReduceMax", ["orig_im_size"], [p + "long"], keepdims=1),
        n("Div", [p + "image_size", p + "long"], [p + "scale"]),
        n("Mul", ["orig_im_size", p + "scale"], [p + "scaled"]),
        n("Add", [p + "scaled", p + "half"], [p + "rounded"]),
        n("Floor", [p + "rounded"], [p + "floor"]),
        n("Cast", [p + "floor"], [p + "prepadded"], to=TensorProto.INT64),
        n("Slice", [p + "up", p + "zeros2", p + "prepadded", p + "axes23"], [p + "cropped"]),
        n("Cast", ["orig_im_size"], [p + "orig"], to=TensorProto.INT64),
        n("Concat", [p + "bc", p + "orig"], [p + "out_size"], axis=0),
        n("Resize", [p + "cropped", "", "", p + "out_size"], [out], mode="linear",
          coordinate_transformation_mode="pytorch_half_pixel"),
    ]


def _remove_nodes(g: onnx.GraphProto, which: Callable[[onnx.NodeProto], bool]) -> None:
    kept = [node for node in g.node if not which(node)]
    del g.node[:]
    g.node.extend(kept)


def fix_crop(model: onnx.ModelProto) -> List[str]:
    """An official-form decoder whose crop was frozen at the size it was exported with
    (segment-anything 1.0 crops with ``int(tensor)``, which the tracer records as a
    constant): its ``masks`` are recomputed from its ``low_res_masks`` by ``_upscale_nodes``,
    right at every image size."""
    g = model.graph
    outputs = [o.name for o in g.output]
    if not {"masks", "low_res_masks"} <= set(outputs) or \
            "orig_im_size" not in {v.name for v in g.input}:
        raise SamOnnxError("only a decoder with the official form (orig_im_size in; masks and "
                           "low_res_masks out) has a crop to fix")
    masks = onnx.ValueInfoProto()
    masks.CopyFrom(next(o for o in g.output if o.name == "masks"))
    _rename_everywhere(g, "masks", "sam_onnx_frozen_masks")
    _keep_outputs(g, [o for o in outputs if o != "masks"])
    g.node.extend(_upscale_nodes(g, "low_res_masks", "masks"))
    kept = {o.name: o for o in g.output}
    del g.output[:]
    g.output.extend(masks if o == "masks" else kept[o] for o in outputs)
    return ["masks recomputed from low_res_masks: the crop follows orig_im_size"]


def to_single(model: onnx.ModelProto) -> List[str]:
    """An ``official`` decoder becomes ``official_single``: segment-anything's select_masks
    as nodes (the single-mask token's score raised by (num_points - 2.5) * 1000; the best
    score picks the mask, its score and its low-res logits)."""
    g = model.graph
    if {v.name for v in g.input} != set(DECODER_OFFICIAL.input_names) or \
            [o.name for o in g.output] != list(DECODER_OFFICIAL.output_names):
        raise SamOnnxError("only an official decoder (six inputs; masks, iou_predictions, "
                           "low_res_masks) can be made to return a single mask")
    for name, inner in _ALL.items():
        _rename_everywhere(g, name, inner)
    g.initializer.extend([
        helper.make_tensor("sam_onnx_one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("sam_onnx_two", TensorProto.INT64, [1], [2]),
        helper.make_tensor("sam_onnx_two_and_half", TensorProto.FLOAT, [], [2.5]),
        helper.make_tensor("sam_onnx_reweight", TensorProto.FLOAT, [1, NUM_MASK_TOKENS],
                           [1000.0] + [0.0] * (NUM_MASK_TOKENS - 1)),
    ])
    n = helper.make_node
    g.node.extend([
        n("Shape", ["point_coords"], ["sam_onnx_coords_shape"]),
        n("Slice", ["sam_onnx_coords_shape", "sam_onnx_one", "sam_onnx_two"],
          ["sam_onnx_num_points"]),
        n("Cast", ["sam_onnx_num_points"], ["sam_onnx_num_points_f"], to=TensorProto.FLOAT),
        n("Sub", ["sam_onnx_num_points_f", "sam_onnx_two_and_half"], ["sam_onnx_excess"]),
        n("Mul", ["sam_onnx_excess", "sam_onnx_reweight"], ["sam_onnx_bonus"]),
        n("Add", [_ALL["iou_predictions"], "sam_onnx_bonus"], ["sam_onnx_score"]),
        n("ArgMax", ["sam_onnx_score"], ["sam_onnx_best"], axis=1, keepdims=0),
        *(n("Gather", [inner, "sam_onnx_best"], [name], axis=1) for name, inner in _ALL.items()),
    ])
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape))
                    for t in DECODER_OFFICIAL_SINGLE.outputs)
    return ["added segment-anything's select_masks: one mask a prompt"]


def _unselect(model: onnx.ModelProto) -> List[str]:
    """Undo to_single: the four masks it chose among become the outputs again."""
    g = model.graph
    if not any(_ALL["masks"] in node.output for node in g.node):
        raise SamOnnxError("this decoder chose its mask inside the graph without keeping the "
                           "other three: export it again with --decoder-contract official")
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(inner, TensorProto.FLOAT, list(t.shape))
                    for t, inner in zip(DECODER_OFFICIAL.outputs, _ALL.values()))
    _prune(g)
    for name, inner in _ALL.items():
        _rename_everywhere(g, inner, name)
    return ["removed the single-mask selection: all four masks returned"]


def to_lowres(model: onnx.ModelProto) -> List[str]:
    """An ``official`` decoder becomes the 4-input ``lowres`` one for wrappers that feed 4:
    has_mask_input is computed from mask_input (any non-zero value), orig_im_size is fixed, and
    the upscaled masks output is dropped with the nodes only it used."""
    g = model.graph
    if {v.name for v in g.input} != set(DECODER_OFFICIAL.input_names):
        raise SamOnnxError("only an official decoder can be adapted to the lowres contract")
    kept = [v for v in g.input if v.name in DECODER_LOWRES.input_names]
    del g.input[:]
    g.input.extend(kept)
    _rename_everywhere(g, "has_mask_input", _HAS_MASK)
    n = helper.make_node
    g.initializer.extend([helper.make_tensor("sam_onnx_zero", TensorProto.FLOAT, [], [0.0]),
                          helper.make_tensor("orig_im_size", TensorProto.FLOAT, [2],
                                             [float(IMAGE_SIZE)] * 2)])
    prologue = [
        n("Abs", ["mask_input"], ["sam_onnx_abs"]),
        n("ReduceMax", ["sam_onnx_abs"], ["sam_onnx_max"], keepdims=0),
        n("Greater", ["sam_onnx_max", "sam_onnx_zero"], ["sam_onnx_any"]),
        n("Cast", ["sam_onnx_any"], ["sam_onnx_any_f"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["sam_onnx_any_f", "sam_onnx_axis0"], [_HAS_MASK]),
    ]
    g.initializer.append(helper.make_tensor("sam_onnx_axis0", TensorProto.INT64, [1], [0]))
    for node in reversed(prologue):
        g.node.insert(0, node)
    _keep_outputs(g, DECODER_LOWRES.output_names)
    return ["has_mask_input computed from mask_input; orig_im_size fixed at 1024x1024",
            "dropped the masks output and its upscaling"]


#: What to_lowres computes has_mask_input with (to_official removes it again).
_LOWRES_PROLOGUE = ("sam_onnx_abs", "sam_onnx_max", "sam_onnx_any", "sam_onnx_any_f", _HAS_MASK)


def to_batched(model: onnx.ModelProto) -> List[str]:
    """A many-prompt decoder that returns every prompt's masks becomes a ``batched`` one:
    pred_iou_thresh picks the prompts whose masks are returned and kept_prompts says which.
    The masks are picked after they are computed (an exported batched decoder skips them)."""
    g = model.graph
    if {v.name for v in g.input} != UNFILTERED_BATCHED_INPUTS:
        raise SamOnnxError("only a decoder taking image_embeddings, point_coords and "
                           "point_labels can be adapted to the batched contract")
    if {"low_res_masks", "iou_predictions"} - {o.name for o in g.output}:
        raise SamOnnxError("the decoder's outputs must be named low_res_masks and "
                           "iou_predictions first: --rename OLD=low_res_masks")
    thresh = DECODER_BATCHED.input("pred_iou_thresh")
    masks, _, kept = DECODER_BATCHED.outputs
    _rename_everywhere(g, masks.name, "sam_onnx_all_masks")
    _rename_everywhere(g, kept.name, "sam_onnx_inner_kept")  # an inner tensor of that name
    g.input.append(helper.make_tensor_value_info(thresh.name, TensorProto.FLOAT, thresh.shape))
    g.initializer.extend([
        helper.make_tensor("sam_onnx_ones4", TensorProto.FLOAT, [4, 1], [1.0] * 4),
        helper.make_tensor("sam_onnx_all4", TensorProto.FLOAT, [], [3.5]),
        helper.make_tensor("sam_onnx_flat", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("sam_onnx_zero1", TensorProto.INT64, [1], [0]),
        helper.make_tensor("sam_onnx_one1", TensorProto.INT64, [1], [1]),
    ])
    n = helper.make_node
    g.node.extend([  # kept: prompts whose four scores are not all at or below the threshold
        n("LessOrEqual", ["iou_predictions", thresh.name], ["sam_onnx_at_or_below"]),
        n("Cast", ["sam_onnx_at_or_below"], ["sam_onnx_below_f"], to=TensorProto.FLOAT),
        n("MatMul", ["sam_onnx_below_f", "sam_onnx_ones4"], ["sam_onnx_count"]),  # any opset
        n("Less", ["sam_onnx_count", "sam_onnx_all4"], ["sam_onnx_keep"]),
        n("NonZero", ["sam_onnx_keep"], ["sam_onnx_nonzero"]),
        n("Slice", ["sam_onnx_nonzero", "sam_onnx_zero1", "sam_onnx_one1"], ["sam_onnx_rows"]),
        n("Reshape", ["sam_onnx_rows", "sam_onnx_flat"], [kept.name]),
        n("Gather", ["sam_onnx_all_masks", kept.name], [masks.name], axis=0),
    ])
    outputs = {o.name: o for o in g.output}
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info(masks.name, TensorProto.FLOAT, masks.shape),
        outputs["iou_predictions"],
        helper.make_tensor_value_info(kept.name, TensorProto.INT64, kept.shape)])
    return ["added pred_iou_thresh: masks only for the prompts with a score above it",
            "added kept_prompts"]


def keep_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` that computes only the outputs ``names``: the nodes and
    initializers only the other outputs used are gone."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    _keep_outputs(pruned.graph, names)
    return pruned


def bind_inputs(model: onnx.ModelProto, values: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs ``values`` are constants: ONNX Runtime then folds
    everything computed from them alone when it loads the graph."""
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    graph = bound.graph
    kept = [i for i in graph.input if i.name not in values]
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name)
                             for name, v in values.items())
    del graph.input[:]
    graph.input.extend(kept)
    return bound


#: Ops whose result changes from run to run with the same inputs: never computed ahead.
_VARYING = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Multinomial", "Bernoulli"}


def split_at_inputs(model: onnx.ModelProto, inputs
                    ) -> Optional[Tuple[onnx.ModelProto, onnx.ModelProto]]:
    """``model`` as two graphs: the part computed from the inputs ``inputs`` alone (and
    constants), and the rest, which takes that part's results as inputs by their names in
    ``model``; None when no node depends on ``inputs`` alone or a result's type is unknown.

    For a decoder, ``inputs`` are the image's: the part run once an image then does what
    every prompt of that image would repeat (the image tokens' layout, their positional sum,
    a batched decoder's first-layer projections)."""
    g = model.graph
    known = {i.name for i in g.initializer} | {""}  # "": an optional input left out
    ahead = set(inputs) & {i.name for i in g.input}
    later = []  # nodes that depend on other inputs: they stay in the second graph
    for node in g.node:
        reads = set(node.input).union(*(signature.consumed_names(s)
                                        for s in signature.subgraphs(node)))
        if node.op_type in _VARYING or signature.subgraphs(node) or \
                not reads <= known | ahead:
            later.append(node)
        elif reads <= known:
            known.update(node.output)  # constants: ONNX Runtime folds them in either graph
        else:
            ahead.update(node.output)
    read_later = {o.name for o in g.output}.union(
        *(set(n.input).union(*(signature.consumed_names(s) for s in signature.subgraphs(n)))
          for n in later))
    cut = [o for n in g.node for o in n.output if o in ahead and o in read_later]
    if not cut:
        return None
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.value_info) + list(inferred.output)}
    if any(not types.get(name) for name in cut):
        return None
    first, second = onnx.ModelProto(), onnx.ModelProto()
    first.CopyFrom(model)
    second.CopyFrom(model)
    values = [helper.make_tensor_value_info(name, types[name], None) for name in cut]
    graph = first.graph
    kept = [i for i in graph.input if i.name in inputs]
    del graph.input[:], graph.output[:], graph.value_info[:]
    graph.output.extend(values)
    _prune(graph)
    read = signature.consumed_names(graph)
    graph.input.extend(i for i in kept if i.name in read)
    graph = second.graph
    # the image's inputs stay where the rest reads them
    kept = [i for i in graph.input if i.name not in ahead or i.name in read_later]
    nodes = [n for n in graph.node if not set(n.output) & ahead]
    known_types = [v for v in graph.value_info if v.name not in ahead]
    del graph.input[:], graph.node[:], graph.value_info[:]
    graph.input.extend(kept + values)
    graph.value_info.extend(known_types)
    graph.node.extend(nodes)
    _prune(graph)
    return first, second


def _keep_outputs(graph: onnx.GraphProto, names) -> None:
    """In place: the outputs ``names``, in that order, and only what they depend on."""
    outputs = {o.name: o for o in graph.output}
    kept = [outputs[name] for name in names]
    del graph.output[:]
    graph.output.extend(kept)
    _prune(graph)


def _prune(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers no graph output depends on."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
            for sub in signature.subgraphs(node):
                needed.update(signature.consumed_names(sub))
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in float16, inputs and outputs still float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(model, keep_io_types=True)
    _toposort(model.graph)  # the converter appends its input Casts after their consumers
    return model


def _toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so each follows the nodes producing its inputs (original order otherwise)."""
    import heapq

    nodes = list(graph.node)
    producer = {o: i for i, node in enumerate(nodes) for o in node.output}
    waiting = [len({producer[x] for x in node.input if producer.get(x, i) != i})
               for i, node in enumerate(nodes)]
    users: Dict[int, List[int]] = {}
    for i, node in enumerate(nodes):
        for j in {producer[x] for x in node.input if producer.get(x, i) != i}:
            users.setdefault(j, []).append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users.get(i, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise SamOnnxError("the graph has a cycle; it cannot be repaired")
    sorted_nodes = [onnx.NodeProto.FromString(nodes[i].SerializeToString()) for i in order]
    del graph.node[:]
    graph.node.extend(sorted_nodes)


@dataclass(frozen=True)
class Pass:
    """A named repair: ``apply(model, value) -> (model, changes)``, run when ``repair``'s
    option ``option`` is set (to ``selects``, where given), and the tolerance its result is
    compared with the original at (the outputs both graphs have)."""

    name: str
    option: str
    apply: Callable[[onnx.ModelProto, Any], Tuple[onnx.ModelProto, List[str]]]
    precision: str
    doc: str
    selects: Optional[str] = None
    #: Outputs the pass means to change (a wrong crop made right): not compared.
    recomputes: Tuple[str, ...] = ()
    #: Names the pass gives inputs and outputs (None: an output it drops): the original's
    #: outputs are compared with the result's under these.
    renames: Dict[str, Optional[str]] = field(default_factory=dict)

    def wanted(self, value) -> bool:
        if self.selects is not None:
            return value == self.selects
        return value is not None and value is not False and value != {}


def _in_place(edit: Callable[..., List[str]], with_value: bool = True):
    """A pass that edits the model in place and returns its changes."""
    def apply(model: onnx.ModelProto, value):
        return model, (edit(model, value) if with_value else edit(model))
    return apply


def _opset(model: onnx.ModelProto, target: int):
    before = graph_io.opset(model)
    if before == target:
        return model, []
    return convert_opset(model, target), [f"opset {before} -> {target}"]


def _simplify(model: onnx.ModelProto, _):
    return graph_io.simplify(model, "repair without --simplify"), ["simplified with onnxsim"]


def _fp16(model: onnx.ModelProto, _):
    return fp16(model), ["weights and compute in float16, inputs and outputs float32"]


#: Decoder contract -> the edit that converts a decoder to it.
CONTRACT_CONVERSIONS = {"official": to_official, "official_single": to_single,
                        "lowres": to_lowres, "batched": to_batched,
                        "sam2_official": to_sam2_official}

#: The names a conversion gives another tool's inputs and outputs (see Pass.renames).
CONVERSION_NAMES = {"sam2_official": SAM2_ORT_NAMES}

#: Every repair pass, in the order ``repair`` applies the ones asked for.
PASSES: Dict[str, Pass] = {p.name: p for p in (
    Pass("drop_initializer_inputs", "drop_initializer_inputs",
         _in_place(drop_initializer_inputs, with_value=False), "fp32",
         "stop listing initializers as graph inputs"),
    Pass("rename", "rename", _in_place(rename), "fp32",
         "rename inputs/outputs (compared by their new names)"),
    Pass("dynamic_points", "dynamic_points", _in_place(dynamic_points, with_value=False),
         "fp32", "make the point (and a fixed prompt) axis symbolic"),
    Pass("fix_crop", "fix_crop", _in_place(fix_crop, with_value=False), "fp32",
         "recompute masks from low_res_masks: a crop frozen at export follows orig_im_size",
         recomputes=("masks",)),
    *(Pass(f"to_{name}", "contract", _in_place(convert, with_value=False), "fp32",
           f"convert a decoder to the {name} contract (the outputs both have are compared)",
           selects=name, renames=CONVERSION_NAMES.get(name, {}))
      for name, convert in CONTRACT_CONVERSIONS.items()),
    Pass("opset", "opset", _opset, "fp32", "onnx's version converter"),
    Pass("ir_version", "ir_version", _in_place(set_ir_version), "fp32", "lower the IR version"),
    Pass("simplify", "simplify", _simplify, "fp32", "onnxsim"),
    Pass("fp16", "fp16", _fp16, "fp16", "float16 weights and compute, float32 inputs/outputs"),
)}


def apply(model: onnx.ModelProto, options: Dict[str, Any]
          ) -> Tuple[onnx.ModelProto, List[str], List[Pass]]:
    """Apply the passes whose option is set, in registry order: (model, changes, the passes
    that changed something)."""
    changes: List[str] = []
    applied: List[Pass] = []
    for p in PASSES.values():
        if not p.wanted(options.get(p.option)):
            continue
        model, done = p.apply(model, options[p.option])
        if done:
            applied.append(p)
            changes.extend(f"{p.name}: {d}" for d in done)
    return model, changes, applied
