"""Say, before anything runs, every way a graph and a feed don't fit: the rules and their checks.

ONNX Runtime stops at the first problem; this reports all of them, each with the ONNX
Runtime error it predicts and the fix. Only the graph's protobuf is read: external weights
are checked for presence and size, never loaded (``tools.validate`` runs the graph when asked).
"""
from __future__ import annotations

import difflib
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import onnx

from ..backend import runtime_limits
from ..core.errors import SamOnnxError
from ..families import ALIASES, CONTRACTS, FAMILIES
from . import feeds as feeds_
from . import metadata, passes, plan, signature
from .findings import Finding, Report

ModelSource = Union[str, Path, onnx.ModelProto]


class Rule:
    """A rule: stable code, name and severity; ``finding()`` fills in the rest."""

    def __init__(self, code: str, name: str, severity: str) -> None:
        self.code, self.name, self.severity = code, name, severity

    def finding(self, target: str, message: str, fix: str = "", **kw) -> Finding:
        return Finding(self.code, self.name, self.severity, target, message, fix, **kw)


# The file
FILE_MISSING = Rule("SAM001", "file-missing", "error")
FILE_EMPTY = Rule("SAM002", "file-empty", "error")
FILE_NOT_ONNX = Rule("SAM003", "not-onnx", "error")
FILE_TRUNCATED = Rule("SAM004", "file-truncated", "error")
EXTERNAL_MISSING = Rule("SAM005", "external-data-missing", "error")
EXTERNAL_SHORT = Rule("SAM006", "external-data-too-short", "error")
CHECKER = Rule("SAM007", "onnx-checker", "error")
# Versions
IR_TOO_NEW = Rule("SAM010", "ir-version-unsupported", "error")
OPSET_TOO_NEW = Rule("SAM011", "opset-unsupported", "error")
# Inputs vs feed
MISSING_INPUT = Rule("SAM020", "missing-input", "error")
UNEXPECTED_INPUT = Rule("SAM021", "unexpected-input", "error")
DTYPE = Rule("SAM022", "input-dtype", "error")
RANK = Rule("SAM023", "input-rank", "error")
DIM = Rule("SAM024", "input-dim", "error")
SYMBOLIC_DIM = Rule("SAM025", "symbolic-dim-unchecked", "warning")
INITIALIZER_INPUT = Rule("SAM026", "initializer-as-input", "info")
UNUSED_INPUT = Rule("SAM027", "unused-input", "warning")
# SAM-aware
CONTRACT_MATCH = Rule("SAM030", "contract-match", "info")
CONTRACT_NEAREST = Rule("SAM031", "contract-nearest", "warning")
RECORDED_CONTRACT = Rule("SAM032", "recorded-contract-differs", "error")
PAIR_EMBEDDINGS = Rule("SAM033", "pair-embeddings", "error")
PAIR_MODEL_TYPE = Rule("SAM034", "pair-model-type", "error")
PAIR_OK = Rule("SAM035", "pair-fits", "info")
# Running
RUN_FAILED = Rule("SAM040", "run-failed", "error")
NON_FINITE = Rule("SAM041", "non-finite-output", "error")
FROZEN_CROP = Rule("SAM042", "frozen-crop", "error")

RULES = {r.code: r for r in globals().values() if isinstance(r, Rule)}
#: Findings after which the file could not be read at all (the CLI exits 2).
UNREADABLE = {r.code for r in (FILE_MISSING, FILE_EMPTY, FILE_NOT_ONNX, FILE_TRUNCATED)}


def repair_command(name: str, options: str, what: str = "fixed") -> str:
    """The repair that ``options`` make, as a command runnable as printed: it reads the graph
    validated (``MODEL.onnx`` for one given as a protobuf) and writes ``NAME.WHAT.onnx``
    beside it, never over it."""
    path = Path(name if name.endswith(".onnx") else "MODEL.onnx")
    out = path.with_name(f"{path.stem}.{what}{path.suffix}")
    return (f"sam-onnx repair {shlex.quote(str(path))} -o {shlex.quote(str(out))} "
            f"{options}")


def _ort_type(dtype: str) -> str:
    return f"tensor({ {'float32': 'float', 'float64': 'double'}.get(dtype, dtype) })"


def read(path: Path, report: Report) -> Optional[onnx.ModelProto]:
    """The graph's protobuf without its external weights, or None with the reason reported."""
    name = str(path)
    if not path.is_file():
        report.add(FILE_MISSING.finding("model", f"{path} does not exist",
                                        "check the path", model=name))
        return None
    with path.open("rb") as file:
        head = file.read(64)
    if not head:
        report.add(FILE_EMPTY.finding("model", f"{path} is empty (0 bytes)",
                                      "export or download it again", model=name))
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # untrusted bytes: protobuf and onnx raise several types
        kind = _what_is(head)
        rule = FILE_TRUNCATED if kind == "onnx" else FILE_NOT_ONNX
        msg = (f"{path} is a damaged or truncated ONNX file ({str(exc) or type(exc).__name__})"
               if kind == "onnx" else f"{path} is not an ONNX model: it looks like {kind}")
        report.add(rule.finding("model", msg, "export or download the model again", model=name))
        return None
    if not model.HasField("graph") or not model.graph.node:
        report.add(FILE_NOT_ONNX.finding(
            "model", f"{path} parses as protobuf but holds no ONNX graph",
            "pass an .onnx model file", model=name))
        return None
    if _undecodable_text(model):
        report.add(FILE_TRUNCATED.finding(
            "model", f"{path} is a damaged ONNX file (names or metadata that are not UTF-8 "
            "text)", "export or download the model again", model=name))
        return None
    return model


def readable(path: Union[str, Path]) -> onnx.ModelProto:
    """The graph's protobuf, or a SamOnnxError naming, as validate's findings do, why it
    cannot be loaded (missing, empty, not ONNX, truncated, its external data missing or
    short) and the fix: what the runtime and repair check before they load a graph."""
    path, report = Path(path), Report()
    model = read(path, report)
    if model is not None:
        _external_data(path, model, report)
    if report.errors:
        first = report.errors[0]
        raise SamOnnxError(f"{first.message}; {first.fix}")
    return model


def _undecodable_text(model: onnx.ModelProto) -> bool:
    """Whether a name or metadata entry the checks read is not UTF-8: protobuf hands such
    string fields back as bytes (found by fuzzing damaged files)."""
    g = model.graph
    texts = [v.name for v in (*g.input, *g.output, *g.initializer)]
    texts += [d.dim_param for v in g.input for d in v.type.tensor_type.shape.dim]
    texts += [x for p in model.metadata_props for x in (p.key, p.value)]
    return any(not isinstance(t, str) for t in texts)


def _what_is(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pth checkpoint?)"
    if head.startswith((b"\x80\x02", b"\x80\x04", b"\x80\x05")):
        return "a Python pickle"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text"
    if head.startswith(b"\x08") and b"\x12" in head[:16]:
        return "onnx"  # field 1 (ir_version) then field 2 (producer_name): an ONNX header
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary data that is not an ONNX protobuf"


def _external_data(path: Path, model: onnx.ModelProto, report: Report) -> bool:
    """Each external file present and long enough for every tensor that points into it."""
    ends: Dict[str, int] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        try:
            end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        except ValueError:
            end = 0
        location = info.get("location", "")
        ends[location] = max(ends.get(location, 0), end)
    ok = True
    for location, end in ends.items():
        data = path.parent / location
        if not data.is_file():
            report.add(EXTERNAL_MISSING.finding(
                "model", f"external data file {location} is missing beside {path.name}",
                f"copy {location} next to {path.name} (weights live there)", model=str(path)))
            ok = False
        elif data.stat().st_size < end:
            report.add(EXTERNAL_SHORT.finding(
                "model", f"{location} has {data.stat().st_size} bytes, tensors need {end}",
                f"copy {location} again: it is truncated", expected=str(end),
                actual=str(data.stat().st_size), model=str(path)))
            ok = False
    return ok


def _versions(model: onnx.ModelProto, report: Report, name: str) -> None:
    max_ir, max_opset = runtime_limits()
    if model.ir_version > max_ir:
        report.add(IR_TOO_NEW.finding(
            "model", f"IR version {model.ir_version} is newer than this ONNX Runtime loads",
            f"{repair_command(name, f'--ir-version {max_ir}')}; or upgrade onnxruntime",
            expected=f"<= {max_ir}", actual=str(model.ir_version), model=name,
            ort_error=f"Unsupported model IR version: {model.ir_version}, max supported IR "
                      f"version: {max_ir}"))
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > max_opset:
            report.add(OPSET_TOO_NEW.finding(
                "model", f"opset {op.version} is newer than this ONNX Runtime supports",
                f"{repair_command(name, f'--opset {max_opset}')}; or upgrade onnxruntime",
                expected=f"<= {max_opset}", actual=str(op.version), model=name,
                ort_error=f"Current official support for domain ai.onnx is till opset "
                          f"{max_opset}"))


def _graph_inputs(model: onnx.ModelProto, report: Report, name: str) -> None:
    init = {i.name for i in model.graph.initializer}
    used = signature.consumed_names(model.graph) | {o.name for o in model.graph.output}
    for value in model.graph.input:
        if value.name in init:
            report.add(INITIALIZER_INPUT.finding(
                f"input:{value.name}", "an initializer listed as a graph input (old exporters "
                "do this): optional to feed, not missing",
                repair_command(name, "--drop-initializer-inputs"), model=name))
        elif value.name not in used:
            report.add(UNUSED_INPUT.finding(
                f"input:{value.name}", "no node uses this input; feeding it has no effect",
                "check the export: the graph may ignore a prompt you think it uses", model=name))


def _contracts(model: onnx.ModelProto, report: Report, name: str) -> None:
    recorded = metadata.recorded_contract(model)
    if recorded is not None:
        problems = signature.mismatches(model, recorded)
        if problems:
            report.add(RECORDED_CONTRACT.finding(
                "model", f"the graph no longer follows the {recorded.name} contract recorded in "
                f"its metadata: {'; '.join(problems)}", "export it again, or repair it to the "
                "contract", model=name))
    best, problems = signature.nearest_contract(model)
    if not problems:
        report.add(CONTRACT_MATCH.finding("model", f"matches the {best.name} contract",
                                          model=name))
    else:
        fixable = best.role == "decoder" and repairable(model, best.name)
        report.add(CONTRACT_NEAREST.finding(
            "model", f"matches no declared contract; nearest is {best.name} ({len(problems)} "
            f"difference(s): {'; '.join(problems)})",
            repair_command(name, f"--auto --feed {best.name}", best.name) if fixable else
            f"no repair makes it follow {best.name}: export it again with sam-onnx export",
            model=name))


def check_feed(model: onnx.ModelProto, feed: feeds_.Feed, name: str = "",
               suggest: bool = True) -> Report:
    """Every way ``feed`` fails the graph's inputs, as ONNX Runtime would see it: names, then
    each input's dtype, rank and dims, then symbolic dims fed different sizes. ``suggest``:
    whether to look for a repair that makes the graph take the feed."""
    report = Report()
    inputs = {t.name: t for t in signature.graph_inputs(model)}
    _check_names(report, model, inputs, feed, name, suggest)
    symbols: Dict[str, List[Tuple[str, int]]] = {}
    for n, spec in inputs.items():
        if n in feed:
            _check_input(report, spec, feed[n], symbols, name, set(inputs))
    for symbol, uses in symbols.items():
        if len({size for _, size in uses}) > 1:
            where = ", ".join(f"{axis}={size}" for axis, size in uses)
            report.add(SYMBOLIC_DIM.finding(
                "feed", f"{symbol} differs between inputs ({where}); ONNX Runtime does not "
                "check symbolic dims and will fail inside the graph", f"give every {symbol} "
                "axis the same size", model=name))
    return report


def _check_names(report: Report, model: onnx.ModelProto, inputs: Dict, feed: feeds_.Feed,
                 name: str, suggest: bool) -> None:
    """Inputs the feed lacks, and keys the graph does not take (with the nearest name the
    graph lacks a key for). When the feed is a declared contract's and a repair makes the
    graph take it (a lowres decoder fed the official feed), every finding names that repair."""
    optional = {i.name for i in model.graph.initializer}
    missing = [n for n in inputs if n not in feed]
    extra = [k for k in feed if k not in inputs and k not in optional]
    convert = None
    if suggest and (missing or extra):
        fed = next((c.name for c in CONTRACTS.values() if set(c.input_names) == set(feed)),
                   None)
        if fed is not None and repairable(model, fed):
            convert = (f"{repair_command(name, f'--auto --feed {fed}', fed)} (the feed is "
                       f"the {fed} contract's)")
    for n in missing:
        report.add(MISSING_INPUT.finding(
            f"input:{n}", f"the graph needs {n} but the feed has no such key",
            convert or f"add {n} ({inputs[n].dtype}, shape {list(inputs[n].shape)}) to the "
            "feed", expected=n, model=name,
            ort_error=f"Required inputs (['{n}']) are missing from input feed"))
    for key in extra:
        near = difflib.get_close_matches(key, missing, n=1, cutoff=0.6)
        fix = convert or (
            f"rename the key to {near[0]}; or rename the graph's input: "
            f"{repair_command(name, f'--rename {near[0]}={key}')}" if near else
            f"drop {key} from the feed: this graph takes {', '.join(inputs)}")
        report.add(UNEXPECTED_INPUT.finding(
            f"feed:{key}", f"the feed has {key}, which is not an input of the graph"
            + (f" (did you mean {near[0]}?)" if near else ""), fix, actual=key, model=name,
            ort_error=f"Invalid input name: {key}"))


def _check_input(report: Report, spec, entry: feeds_.FeedEntry,
                 symbols: Dict[str, List[Tuple[str, int]]], name: str, inputs: set) -> None:
    """One input's dtype, rank and fixed dims; its symbolic dims' sizes go to ``symbols``.
    ``inputs``: the graph's input names."""
    n = spec.name
    if entry.dtype != spec.dtype:
        report.add(DTYPE.finding(
            f"input:{n}", f"{n} is fed as {entry.dtype}, the graph takes {spec.dtype}",
            f"feed {n} as np.asarray(..., dtype=np.{spec.dtype})", expected=spec.dtype,
            actual=entry.dtype, model=name,
            ort_error=f"Unexpected input data type. Actual: ({_ort_type(entry.dtype)}) , "
                      f"expected: ({_ort_type(spec.dtype)})"))
    if len(entry.shape) != len(spec.shape):
        scalar = " (a bare scalar)" if not entry.shape else ""
        report.add(RANK.finding(
            f"input:{n}", f"{n} has rank {len(entry.shape)}{scalar}, the graph takes rank "
            f"{len(spec.shape)} {list(spec.shape)}",
            _rank_fix(spec, entry),
            expected=str(list(spec.shape)), actual=str(list(entry.shape)), model=name,
            ort_error=f"Invalid rank for input: {n} Got: {len(entry.shape)} Expected: "
                      f"{len(spec.shape)} Please fix either the inputs/outputs or the model."))
        return
    for axis, (want, got) in enumerate(zip(spec.shape, entry.shape)):
        if isinstance(want, int) and want != got:
            report.add(DIM.finding(
                f"input:{n}", f"{n} has size {got} on axis {axis}, the graph fixes it at "
                f"{want}", _dim_fix(spec, axis, name, inputs),
                expected=str(list(spec.shape)), actual=str(list(entry.shape)), model=name,
                ort_error=f"Got invalid dimensions for input: {n} for the following indices"
                          f" index: {axis} Got: {got} Expected: {want}"))
        elif isinstance(want, str):
            symbols.setdefault(want, []).append((f"{n}[{axis}]", got))


def _rank_fix(spec, entry: feeds_.FeedEntry) -> str:
    """How to feed an input of the wrong rank: what it takes; for an encoder's image, the
    other encoder form, which takes what was fed (an HxWx3 image, or the 1x3x1024x1024
    tensor), and the export flag that makes it."""
    if not entry.shape:
        return f"reshape {spec.name} to {list(spec.shape)}, e.g. np.array([x], dtype=np.float32)"
    fix = f"reshape {spec.name} to {list(spec.shape)}"
    if spec.name not in ENCODER_INPUTS:
        return fix
    declared = ENCODER_INPUTS[spec.name]
    fix = f"feed {spec.name} {list(declared.shape)}: {declared.doc}"
    other = next((c for c in ENCODER_FORMS
                  if len(CONTRACTS[c].inputs[0].shape) == len(entry.shape)), None)
    if other is not None:
        image = CONTRACTS[other].inputs[0]
        fix += (f"; or use an encoder that takes {image.name} {list(image.shape)} ({image.doc}):"
                f" sam-onnx export --encoder-contract {ENCODER_FORMS[other]}; "
                "SamOnnxPredictor.set_image feeds either")
    return fix


def _dim_fix(spec, axis: int, name: str, inputs: set) -> str:
    """How to feed an input with a wrong fixed dim: its shape; the mask prompt one mask; a
    point axis made dynamic by repair (where both point inputs have their names: the pass
    finds them by name)."""
    fix = f"feed {spec.name} with shape {list(spec.shape)}"
    if spec.name == "mask_input" and axis == 1:
        fix = ("mask_input takes one mask's low-res logits: pass low_res_masks[:, i:i+1] for "
               "the mask you keep (i: the best of iou_predictions), or export a decoder that "
               "returns one mask: sam-onnx export --return-single-mask")
    elif spec.name in POINT_INPUTS and POINT_INPUTS <= inputs:
        fix += f"; or make the axis dynamic: {repair_command(name, '--dynamic-points')}"
    return fix


#: The passes that change what a graph takes (versions do not).
_SIGNATURE_PASSES = ("drop_initializer_inputs", "rename", "dynamic_points", "contract")


def repairable(model: onnx.ModelProto, feed: str) -> bool:
    """Whether the plan of ``plan.auto(model, feed)``, applied to a copy of the graph (without
    its weights), makes the graph take the feed and follow a declared contract; not when it
    does nothing or is not enough (a fix that cannot be given is not suggested)."""
    try:
        options = plan.auto(model, feed)
    except SamOnnxError:
        return False
    if not options:
        return False
    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    try:
        trial, _, _ = passes.apply(trial, {k: v for k, v in options.items()
                                           if k in _SIGNATURE_PASSES})
    except SamOnnxError:
        return False
    takes = not check_feed(trial, feeds_.load(feed), suggest=False).errors
    return takes and not signature.nearest_contract(trial)[1]


def validate(model: ModelSource, feed: Optional[feeds_.FeedSource] = None) -> Report:
    """Validate one graph (a path or a ModelProto), optionally against a feed, without running
    it (``sam_onnx.validate(..., run=True)`` also runs it)."""
    report = Report()
    if isinstance(model, onnx.ModelProto):
        proto, path, name = model, None, model.graph.name or "<model>"
    else:
        path = Path(model)
        name = str(path)
        proto = read(path, report)
        if proto is None:
            return report
        if _external_data(path, proto, report):
            try:
                onnx.checker.check_model(str(path))  # path-based: beyond 2 GB too
            except Exception as exc:  # the checker raises several types on damaged graphs
                report.add(CHECKER.finding("model", f"onnx.checker: {str(exc).splitlines()[0]}",
                                           "export the model again", model=name))
    _versions(proto, report, name)
    _graph_inputs(proto, report, name)
    _contracts(proto, report, name)
    feed_entries = None if feed is None else feeds_.load(feed)
    if feed_entries is not None:
        report.extend(check_feed(proto, feed_entries, name))
    return report


def validate_pair(encoder: onnx.ModelProto, decoder: onnx.ModelProto,
                  names: Sequence[str] = ("encoder", "decoder")) -> Report:
    """Every encoder output the decoder takes (image_embeddings; HQ-SAM's hq_features;
    SAM 2's image_embed and high-resolution maps) must fit the decoder's input of that name,
    and both must be of one model."""
    report = Report()
    outputs = {t.name: t for t in signature.graph_outputs(encoder)}
    for theirs, ours in ALIASES.items():  # ONNX Runtime's SAM 2 names for the same tensors
        for a, b in ((theirs, ours), (ours, theirs)):
            if a in outputs and b not in outputs:
                outputs[b] = outputs[a]
    inputs = {t.name: t for t in signature.graph_inputs(decoder)}
    embedding = next((name for name in inputs if name in EMBEDDINGS), None)
    if embedding is None or not outputs:
        report.add(PAIR_EMBEDDINGS.finding(
            "pair", f"cannot pair: {names[0]} has no output or {names[1]} has no "
            f"{' or '.join(sorted(EMBEDDINGS))} input", "pass an encoder then a decoder",
            model=names[1]))
        return report
    if embedding not in outputs and len(outputs) == 1:  # another tool's name for it
        outputs[embedding] = next(iter(outputs.values()))
    for name, into in inputs.items():
        source = DERIVED_INPUTS.get(name, name)  # made from an encoder output
        made = "" if source == name else f", made from {source}"
        if name in outputs:
            _pair_tensor(report, outputs.get(name), into, names)
        elif (source in ENCODER_OUTPUTS and source not in outputs) or name == embedding:
            report.add(PAIR_EMBEDDINGS.finding(
                f"input:{name}", f"{names[1]} takes {name}{made}, which {names[0]} does not "
                "return",
                "pair the decoder with its own model's encoder (an HQ-SAM or SAM 2 decoder "
                "needs that model's encoder)", expected=name, model=names[1]))
    types = [metadata.read(m).get("model_type") for m in (encoder, decoder)]
    if all(types) and types[0] != types[1]:
        report.add(PAIR_MODEL_TYPE.finding(
            "pair", f"{names[0]} is {types[0]} but {names[1]} is {types[1]}: the decoder "
            "would decode another model's embeddings", "use the encoder and decoder of one "
            "export", expected=types[0], actual=types[1], model=names[1]))
    if report.ok:
        report.add(PAIR_OK.finding("pair", f"{names[0]}'s embeddings fit {names[1]}"
                                   + (f" ({types[0]})" if types[0] else ""), model=names[1]))
    return report


#: The image embedding's name in each family's graphs.
EMBEDDINGS = {f.embedding for f in FAMILIES.values()}
POINT_INPUTS = {"point_coords", "point_labels"}
#: Encoder contract -> the ``--encoder-contract`` form that exports it.
ENCODER_FORMS = {**{f.encoder.name: "tensor" for f in FAMILIES.values()},
                 **{c: form for f in FAMILIES.values() for form, c in f.encoder_forms.items()}}
#: The image inputs of the encoders sam-onnx exports, as declared.
ENCODER_INPUTS = {CONTRACTS[c].inputs[0].name: CONTRACTS[c].inputs[0] for c in ENCODER_FORMS}
#: Decoder inputs the caller makes from an encoder output once an image -> that output.
DERIVED_INPUTS = {name: source for f in FAMILIES.values()
                  for name, (source, _) in f.derived_inputs.items()}
#: Decoder inputs that only an encoder makes, by every family's encoder contract.
ENCODER_OUTPUTS = {t.name for c in CONTRACTS.values() if c.role == "encoder" for t in c.outputs}


def _pair_tensor(report: Report, out, into, names: Sequence[str]) -> None:
    if out.dtype != into.dtype or len(out.shape) != len(into.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b
            for a, b in zip(out.shape, into.shape)):
        report.add(PAIR_EMBEDDINGS.finding(
            f"input:{into.name}", f"{names[0]} returns {out.name} {out.dtype} "
            f"{list(out.shape)}, {names[1]} takes {into.dtype} {list(into.shape)}",
            "export both graphs from the same model and precision",
            expected=f"{into.dtype} {list(into.shape)}", actual=f"{out.dtype} {list(out.shape)}",
            model=names[1]))


__all__ = ["validate", "validate_pair", "check_feed", "RULES", "read", "Report"]
