"""``SamOnnxPredictor``: segment_anything's SamPredictor on ONNX Runtime, without torch.

The decoder's contract is read from the graph (the metadata the exporter records, else its
inputs and outputs) and the feed is built for exactly that contract; a feed the graph would
refuse is refused first, with the validator's finding.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from .. import families
from ..core.contracts import EVERY_PROMPT, GraphContract
from ..core.errors import SamOnnxError
from ..families.base import Family
from ..families.sam.contracts import DECODER_BATCHED, DECODER_LOWRES
from ..graph import metadata, signature
from ..graph import passes as repair_passes
from ..graph.feeds import from_arrays
from ..graph.validate import (
    check_feed,
    readable,
    repair_command,
    repairable,
    validate_pair,
)
from . import transforms
from .images import ImageLike, load_image
from .sessions import (
    CPU,
    Session,
    SessionConfig,
    create,
    runnable_providers,
    warn_fallback,
)

PathLike = Union[str, Path]


def graph_contract(model: onnx.ModelProto, name: str) -> GraphContract:
    """The contract a graph follows: recorded by the exporter, else matched by its signature."""
    recorded = metadata.recorded_contract(model)
    if recorded is not None and not signature.mismatches(model, recorded):
        return recorded
    nearest, problems = signature.nearest_contract(model)
    if problems:
        fix = f"run sam-onnx validate {name}"
        if nearest.role == "decoder" and repairable(model, nearest.name):
            auto = f"--auto --feed {nearest.name}"
            fix += f", or {repair_command(str(name), auto, nearest.name)}"
        raise SamOnnxError(
            f"{Path(name).name} follows no known contract (nearest {nearest.name}: "
            f"{'; '.join(problems)}); {fix}")
    return nearest


def graph_family(model: onnx.ModelProto, contract: GraphContract) -> Family:
    """The family a graph belongs to: recorded by the exporter, else the one declaring the
    contract its signature matches (another tool's export)."""
    return families.of_graph(metadata.read(model)) or families.declaring(contract)


#: What the predictor takes from any decoder (the lowres contract's outputs, and the batched
#: one's kept prompts); it upscales the logits itself.
READ_OUTPUTS = tuple(dict.fromkeys(DECODER_LOWRES.output_names + DECODER_BATCHED.output_names))


def read_outputs(contract: GraphContract, low_res_size: int) -> Dict[str, str]:
    """The decoder outputs the predictor reads, by its name for each: ``READ_OUTPUTS``, and
    ``masks`` as the low-res logits where a graph returns them at low resolution under that
    name (samexporter's SAM 2 decoder)."""
    names = {name: name for name in contract.output_names if name in READ_OUTPUTS}
    if "low_res_masks" not in names and "masks" in contract.output_names and \
            contract.output("masks").shape[-2:] == (low_res_size, low_res_size):
        names["masks"] = "low_res_masks"
    return names


def _decoder_source(path: PathLike, graph: onnx.ModelProto, contract: GraphContract,
                    read: Sequence[str], bound: Dict[str, np.ndarray]):
    """What a decoder session loads: the graph cut at the outputs the predictor reads (an
    ``official`` graph's upscaling is left out: the predictor upscales in numpy, 3-6 ms
    against the graph's 15 ms for vit_b at 1800x1200, measured) with the inputs ``bound``
    made constants; the file itself when there is nothing to change."""
    read = list(read)
    if len(read) == len(contract.output_names) and not bound:
        return path
    return repair_passes.bind_inputs(repair_passes.keep_outputs(_with_weights(path, graph), read),
                                     bound)


def _with_weights(path: PathLike, graph: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` with its weights: they are inside it, unless they live in a .data file
    beside it."""
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer):
        return graph
    try:
        return onnx.load(str(path))  # a decoder is ~20 MB
    except (OSError, onnx.checker.ValidationError) as exc:
        raise SamOnnxError(f"cannot read the weights of {path} ({exc}); keep the files "
                           "the exporter wrote together") from None


def _mask_prompt(mask_input: Optional[np.ndarray], size: int,
                 rows: int = 1) -> Dict[str, np.ndarray]:
    """The mask-prompt inputs of the decoders that take them, for ``rows`` prompts (a mask
    each, or none); zeros when there is none."""
    mask = np.zeros((rows, 1, size, size), np.float32)
    if mask_input is not None:
        m = np.asarray(mask_input, dtype=np.float32)
        if m.shape not in ((rows, size, size), (rows, 1, size, size)):
            raise SamOnnxError(f"mask_input must be {rows}x{size}x{size} low-res logits (the "
                               f"third value predict() returns); got {m.shape}")
        mask[...] = m.reshape(mask.shape)
    return {"mask_input": mask,
            "has_mask_input": np.full(rows, float(mask_input is not None), np.float32)}


def stability(logits: np.ndarray, delta: float) -> np.ndarray:
    """SAM 2's MaskDecoder._get_stability_scores: the area above +delta over the area above
    -delta, per mask (1 where both are empty)."""
    flat = logits.reshape(*logits.shape[:-2], -1)
    inner = np.count_nonzero(flat > delta, axis=-1)
    outer = np.count_nonzero(flat > -delta, axis=-1)
    return np.where(outer > 0, inner / np.maximum(outer, 1), 1.0)


#: How decoder sessions differ from the caller's config: no memory pattern (it plans for one
#: prompt count: other counts made the first run 3x slower), and ONNX Runtime's BiasGelu
#: fusion off: its kernel took 2 ms on the upscaler's 2 M values, where Add then Gelu take
#: 1.2 (same outputs; vit_b decoder 18.4 -> 18.0 ms a prompt). The encoder is faster with it.
DECODER_SESSION = dict(memory_pattern=False, disabled_optimizers=("BiasGeluFusion",))


#: What each point label means to SAM's prompt encoder (SAM 2's too).
POINT_LABELS = {1: "foreground", 0: "background", 2: "a box's top-left corner",
                3: "a box's bottom-right corner", -1: "padding, ignored"}


def check_labels(labels: np.ndarray, with_box: bool = False) -> None:
    """Refuse point labels SAM's prompt encoder would misread, with what each label means:
    a value that is none of them; only padding (and no box); box corners (2, 3) that do not
    pair up."""
    values = np.unique(labels)
    unknown = [v for v in values.tolist() if v not in POINT_LABELS]
    if unknown:
        meanings = ", ".join(f"{k} {v}" for k, v in POINT_LABELS.items())
        raise SamOnnxError(f"point label {unknown[0]:g} is not a SAM label ({meanings}); "
                           "label points 1 or 0, and give a box as a box")
    if labels.size and (labels == -1).all() and not with_box:
        raise SamOnnxError("every point is labelled -1 (padding, which SAM ignores): label a "
                           "point 1 (foreground) or 0 (background), or give a box")
    corners = labels[(labels == 2) | (labels == 3)]
    if len(corners) % 2 or (corners[0::2] != 2).any() or (corners[1::2] != 3).any():
        raise SamOnnxError("labels 2 and 3 mark a box's top-left and bottom-right corners and "
                           f"come in pairs (2 then 3); got {corners.astype(int).tolist()}: "
                           "give the box as a box (box=, --box) instead")


def _points(point_coords, point_labels, with_box: bool, shape: str, parts: list,
            labels: list) -> bool:
    """Checked points (``shape`` "N": Nx2 coords and N labels; "BxN": a row per prompt)
    appended to ``parts`` and ``labels``; whether there were any."""
    if (point_coords is None) != (point_labels is None):
        raise SamOnnxError("point_coords and point_labels go together: pass both or neither")
    if point_coords is None:
        return False
    coords = np.asarray(point_coords, dtype=np.float64)
    lab = np.asarray(point_labels, dtype=np.float64)
    if coords.ndim != len(shape.split("x")) + 1 or coords.shape[-1] != 2 or \
            lab.shape != coords.shape[:-1]:
        raise SamOnnxError(f"point_coords must be {shape}x2 and point_labels {shape}; got "
                           f"{coords.shape} and {lab.shape}")
    check_labels(lab, with_box=with_box)
    parts.append(coords)
    labels.append(lab)
    return True


def check_prompt(point_coords=None, point_labels=None, box=None,
                 image_size: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A prompt as SamPredictor.predict takes it -> (coords Nx2, labels N) in the image's
    pixels, the points then the box's corners (labels 2, 3); or a SamOnnxError naming what
    is wrong. It needs no graph, so a command checks its prompt before the encoder's seconds
    (with ``image_size``, (h, w), also that the points lie near the image)."""
    parts, labels = [], []
    _points(point_coords, point_labels, box is not None, "N", parts, labels)
    if box is not None:
        b = np.asarray(box, dtype=np.float64).reshape(-1)
        if b.shape != (4,):
            raise SamOnnxError(f"box must be x0, y0, x1, y1; got shape {np.shape(box)}")
        parts.append(b.reshape(2, 2))
        labels.append(np.array([2.0, 3.0]))
    if not parts:
        raise SamOnnxError("give a prompt: point_coords with point_labels, and/or a box")
    coords, lab = np.concatenate(parts), np.concatenate(labels)
    if not np.isfinite(coords).all():
        raise SamOnnxError("prompt coordinates contain NaN or Inf")
    if image_size is not None:
        h, w = image_size
        if (coords[:, 0] < -w).any() or (coords[:, 0] > 2 * w).any() or \
                (coords[:, 1] < -h).any() or (coords[:, 1] > 2 * h).any():
            raise SamOnnxError(f"prompt coordinates far outside the {w}x{h} image: "
                               f"{coords.min(0).tolist()} .. {coords.max(0).tolist()}; they "
                               "are (x, y) in the original image's pixels")
    return coords, lab


class SamOnnxPredictor:
    """Mirrors ``segment_anything.SamPredictor``: set_image once, predict many prompts."""

    #: Prompts per run of a batched decoder: its time per prompt is flat from 8 to 128
    #: prompts (measured), its memory is not (~8 MB of activations per prompt).
    decoder_batch = 16

    def __init__(self, encoder: Optional[PathLike], decoder: PathLike,
                 config: SessionConfig = SessionConfig(), release_memory: bool = False) -> None:
        """``release_memory``: hand the encoder's working memory back after every image, for
        a process that keeps the predictor idle between images while other work needs that
        memory. By default it is kept from the second image on, as one image after another
        (an annotation tool, a dataset) wants: the next image then does not fault it in
        again. The first image's goes back: ONNX Runtime records its memory pattern on the
        first run and asks for it as one block on later runs, which an arena still holding
        the first run's pieces cannot serve, so it grows by as much again (vit_b, measured:
        2.1 -> 3.7 GiB). Figures: docs/benchmarks.md, "Encoder, image after image"."""
        self.release_memory = release_memory
        self._images_encoded = 0
        # both graphs' protobufs (their inputs are all the predictor checks against) are read,
        # or refused in validate's one line, before any session is built
        encoder_graph = None if encoder is None else readable(encoder)
        self._decoder_graph = readable(decoder)
        self.decoder_contract = graph_contract(self._decoder_graph, str(decoder))
        if self.decoder_contract.role != "decoder":
            raise SamOnnxError(f"{decoder} is an {self.decoder_contract.role}, not a decoder")
        #: What the graphs' family declares: pre-processing, mask size and threshold.
        self.family = graph_family(self._decoder_graph, self.decoder_contract)
        self._low_res_size = self.family.postprocess.low_res_size
        self._outputs = read_outputs(self.decoder_contract, self._low_res_size)
        #: The graph picks the masks itself: HQ-SAM's decoders take multimask_output; an
        #: official_single decoder returns the one mask segment-anything's select_masks picks.
        self._graph_selects = "multimask_output" in self.decoder_contract.input_names or \
            bool(self.decoder_contract.selects)
        #: The decoder's inputs by the names the predictor builds them under (another tool's
        #: names, e.g. ONNX Runtime's input_masks, mapped onto the family's, mask_input).
        self.inputs = {self.family.aliases.get(n, n): n
                       for n in self.decoder_contract.input_names}
        #: A mask prompt per prompt row (SAM 2's decoders), or one for the run.
        self._mask_rows = "mask_input" in self.inputs and isinstance(
            self.decoder_contract.input(self.inputs["mask_input"]).shape[0], str)
        #: Many prompts a run (a batched decoder), or one. samexporter's SAM 2 decoder
        #: declares a dynamic prompt axis but was traced with one prompt and fails with more
        #: (measured: a Mul broadcasting 16 by 64): only sam-onnx's own such graphs batch.
        self.batched = isinstance(self.decoder_contract.input("point_coords").shape[0], str) \
            and (not self._mask_rows or metadata.recorded_contract(self._decoder_graph) is not None)
        # Prompts without a mask run a session with the mask inputs bound to "no mask",
        # whose mask branch ONNX Runtime folds away at load (vit_b: 17.6 -> 16.2 ms a
        # prompt, measured); a mask prompt runs the whole graph, in a session made for it
        # the first time one comes.
        self._decoder_path = decoder
        self._session_config = dataclasses.replace(config, **DECODER_SESSION)
        self._no_mask = {self.inputs[name]: value for name, value in
                         _mask_prompt(None, self._low_res_size).items() if name in self.inputs}
        self._mask_decoder: Optional[Session] = None
        self._feeds_checked: set = set()
        #: The encoder's contract: it takes the pre-processed tensor, or the resized image
        #: itself (``preprocess_inside``: AnyLabeling's form).
        self.encoder_contract = None if encoder is None else graph_contract(encoder_graph,
                                                                            str(encoder))
        if encoder is not None:
            if self.encoder_contract.role != "encoder":
                raise SamOnnxError(f"{encoder} is not an image encoder")
            _require_pair(encoder_graph, self._decoder_graph, (str(encoder), str(decoder)))
        # The encoder's session is built on another thread while this one makes the
        # decoder's: ONNX Runtime lets go of the GIL while it loads (vit_b, measured: the
        # two sessions 0.54-0.61 s one after the other, 0.49-0.51 s side by side).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            building = None if encoder is None else pool.submit(create, encoder, config,
                                                                  warn=False)
            image_part, rest = self._no_mask_graphs()
            self._image_part = None if image_part is None else self._session(image_part)
            self.decoder: Session = self._session(rest)
            self.encoder: Optional[Session] = None if building is None else building.result()
        for session in (self.decoder, self.encoder):  # said at the caller's line, once
            if session is not None:
                warn_fallback(session, stacklevel=3)
        self.reset_image()

    def _whole_session(self) -> Session:
        """The decoder cut at the outputs the predictor reads, nothing bound: for a mask
        prompt, made when the first one comes."""
        source = _decoder_source(self._decoder_path, self._decoder_graph,
                                 self.decoder_contract, self._outputs, {})
        return self._session(source)

    def _no_mask_graphs(self) -> Tuple[Optional[onnx.ModelProto], onnx.ModelProto]:
        """What prompts without a mask run: the decoder with its mask inputs bound to "no
        mask", split into the part computed from the image alone, run once an image
        (``_set_encoded``), and the rest, run per prompt on its results; unsplit (None and
        the whole) when no part depends on the image alone, or when the sessions would run
        on a device: the part's results (22 MB for sam2_batched) would travel to the host
        and back with every prompt, where the device computes them in less (reasoned, not
        measured: no GPU here)."""
        source = _decoder_source(self._decoder_path, self._decoder_graph,
                                 self.decoder_contract, self._outputs, self._no_mask)
        model = source if isinstance(source, onnx.ModelProto) else \
            _with_weights(source, self._decoder_graph)
        parts = None
        if runnable_providers(self._session_config)[0] == CPU:
            parts = repair_passes.split_at_inputs(
                model, [name for canonical, name in self.inputs.items()
                        if canonical in self.family.image_inputs])
        return (None, model) if parts is None else parts

    def _session(self, graph: Union[PathLike, onnx.ModelProto]) -> Session:
        """A decoder session on a file, or on a graph held in memory."""
        if isinstance(graph, onnx.ModelProto):
            graph = graph.SerializeToString()
        return create(graph, self._session_config, name=Path(self._decoder_path).name,
                      warn=False)

    # -- image ---------------------------------------------------------------------------
    def set_image(self, image: ImageLike, image_format: str = "RGB") -> None:
        """Compute the image embedding once; prompts then only run the decoder."""
        if self.encoder is None:
            raise SamOnnxError("this predictor has no encoder; load_embedding() instead")
        rgb = load_image(image, image_format)
        if self.encoder_contract.preprocess_inside:
            x = transforms.resize_image(rgb, self.family.preprocess)
            self.input_size = x.shape[:2]
        else:
            x, self.input_size = transforms.image_to_input(rgb, self.family.preprocess)
        self.original_size = rgb.shape[:2]
        outputs = self.encoder.run(None, {self.encoder.input_names[0]: x},
                                   release_memory=self.release_memory or
                                   self._images_encoded == 0)
        self._images_encoded += 1
        self._set_encoded(dict(zip(self.encoder.output_names, outputs)))

    def _set_encoded(self, encoded: Dict[str, np.ndarray]) -> None:
        """Every encoder output (HQ-SAM's also returns its HQ features, SAM 2's its
        high-resolution maps), fed to the decoder by name; ``features`` is the image
        embedding, as SamPredictor's."""
        self.encoded = self._canonical(encoded)
        self.features = self.encoded[self.family.embedding]
        #: What the decoder takes made from them, once an image (SAM 2's batched decoder:
        #: the high-resolution maps in block order).
        self._derived = self.family.derive_inputs(self.encoded, self.inputs)
        #: What the decoder computes from the image alone, made once for all its prompts.
        self._ahead: Dict[str, np.ndarray] = {}
        if self._image_part is not None:
            feed = self._typed({**self.encoded, **self._derived},
                               set(self._image_part.input_names))
            self._ahead = dict(zip(self._image_part.output_names,
                                   self._image_part.run(None, feed)))
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        self._require_image()
        return self.features

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.encoded: Dict[str, np.ndarray] = {}
        self._derived: Dict[str, np.ndarray] = {}
        self._ahead: Dict[str, np.ndarray] = {}
        self.original_size = self.input_size = None

    def save_embedding(self, path: PathLike) -> None:
        """Keep the encoder's work: an .npz that load_embedding() reads back."""
        self._require_image()
        np.savez(path, **self.encoded, original_size=self.original_size,
                 input_size=self.input_size)

    def load_embedding(self, path: PathLike) -> None:
        try:
            with np.load(path, allow_pickle=False) as data:
                sizes = {k: tuple(int(v) for v in data[k]) for k in ("original_size",
                                                                     "input_size")}
                encoded = {k: data[k] for k in data.files if k not in sizes}
            if self.family.embedding not in self._canonical(encoded):
                raise KeyError(self.family.embedding)
        except (OSError, KeyError, ValueError) as exc:
            raise SamOnnxError(f"cannot read embedding {path} ({exc}); write it with "
                               "save_embedding()") from None
        self.original_size, self.input_size = sizes["original_size"], sizes["input_size"]
        self._set_encoded(encoded)

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise SamOnnxError("no image: call set_image() (or load_embedding()) before this")

    # -- prompts -------------------------------------------------------------------------
    def predict(self, point_coords: Optional[np.ndarray] = None,
                point_labels: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None,
                mask_input: Optional[np.ndarray] = None, multimask_output: bool = True,
                return_logits: bool = False, hq_token_only: bool = False,
                normalize_coords: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As SamPredictor.predict (and SAM2ImagePredictor.predict): (masks CxHxW, scores C,
        low-res logits Cx256x256).

        ``hq_token_only``: as HQ-SAM's SamPredictor (HQ decoders only), whose decoders return
        one mask: SAM's chosen one plus the HQ mask, or the HQ mask alone. A single-mask
        decoder (``official_single``) returns the mask its graph picks, whatever
        ``multimask_output`` says.
        ``normalize_coords``: as SAM2ImagePredictor's; False when the points and box are
        already relative to the image's width and height (0..1)."""
        self._require_image()
        if not normalize_coords:
            point_coords, box = self._from_relative(point_coords, box)
        coords, labels = self._prompt(point_coords, point_labels, box)
        outputs = self._run(self._feed(coords[None], labels[None], mask_input,
                                       multimask_output=multimask_output,
                                       hq_token_only=hq_token_only))
        low_res, scores = self._select(outputs["low_res_masks"], outputs["iou_predictions"],
                                       multimask_output)
        masks = self.postprocess_masks(low_res[0], return_logits)
        return masks, scores[0], self.clamp_low_res(low_res[0])

    def postprocess_masks(self, low_res: np.ndarray, return_logits: bool = False) -> np.ndarray:
        """Low-res logits (..., 256, 256) -> masks (..., H, W) at the image's size, as the
        family's predictor makes them (thresholded unless ``return_logits``)."""
        post = self.family.postprocess
        return transforms.postprocess_masks(
            low_res, self.input_size, self.original_size, self.family.preprocess.image_size,
            threshold=None if return_logits else post.mask_threshold, upscale=post.upscale)

    def clamp_low_res(self, low_res: np.ndarray) -> np.ndarray:
        """The low-res logits as the family's predictor returns them (SAM 2 clips them)."""
        clamp = self.family.postprocess.low_res_clamp
        return low_res if clamp is None else np.clip(low_res, -clamp, clamp)

    def predict_batch(self, point_coords: Optional[np.ndarray] = None,
                      point_labels: Optional[np.ndarray] = None,
                      multimask_output: bool = True, mask_input: Optional[np.ndarray] = None,
                      boxes: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Many prompts at once, as SamPredictor.predict_torch: coords (B, N, 2) in the
        original image's pixels with labels (B, N), and/or ``boxes`` (B, 4) x0, y0, x1, y1
        (a detector's boxes turned into masks), optionally a low-res mask prompt per prompt
        (B, 256, 256) -> low-res logits (B, C, 256, 256) and scores (B, C); no upscaling
        (``postprocess_masks`` does it). Each row gives what ``predict`` gives for it.

        A ``batched`` decoder takes many prompts in one run (a box is its two corners,
        labelled 2 and 3, as SAM's prompt encoder embeds it); other decoders one per run."""
        low_res, scores, _ = self.predict_batch_filtered(
            point_coords, point_labels, EVERY_PROMPT, multimask_output, mask_input, boxes)
        return low_res, scores

    def predict_batch_filtered(self, point_coords: Optional[np.ndarray],
                               point_labels: Optional[np.ndarray], pred_iou_thresh: float,
                               multimask_output: bool = True,
                               mask_input: Optional[np.ndarray] = None,
                               boxes: Optional[np.ndarray] = None
                               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As predict_batch, but logits only for the prompts with a score above
        ``pred_iou_thresh``: (logits (K, C, 256, 256), scores (B, C), the K prompts' indices,
        increasing).

        A ``batched`` decoder then skips the upscaler, half of a prompt's time, for the others:
        the automatic mask generator drops their masks unseen."""
        self._require_image()
        coords, labels = self._batch_prompts(point_coords, point_labels, boxes)
        b = len(coords)
        coords = self._apply_coords(coords)
        if boxes is None and not self.family.graph_pads:  # the padding predict_torch adds
            coords = np.concatenate([coords, np.zeros((b, 1, 2))], axis=1)
            labels = np.concatenate([labels, -np.ones((b, 1))], axis=1)
        step = self.decoder_batch if self.batched else 1
        scores, low_res, kept = [], [], []
        for i in range(0, b, step):  # bounded runs: same speed per prompt, less memory
            rows = slice(i, i + step)
            out = self._run(self._feed(coords[rows], labels[rows],
                                       None if mask_input is None else mask_input[rows],
                                       pred_iou_thresh, multimask_output))
            # a batched SAM graph returns logits only for the prompts it kept
            kept_rows = out.get("kept_prompts", np.arange(len(out["iou_predictions"])))
            logits, score = self._select(out["low_res_masks"], out["iou_predictions"],
                                         multimask_output, kept_rows)
            scores.append(score)
            # the graph keeps a prompt for any of its four scores; here only the picked count
            # (a NaN score is not "at or below", so it is kept, as in the graph)
            passed = ~(score[kept_rows] <= pred_iou_thresh).all(axis=1)
            low_res.append(logits[passed])
            kept.append(i + kept_rows[passed])
        return np.concatenate(low_res), np.concatenate(scores), np.concatenate(kept)

    @staticmethod
    def _batch_prompts(point_coords, point_labels, boxes) -> Tuple[np.ndarray, np.ndarray]:
        """predict_batch's prompts -> coords (B, N, 2) and labels (B, N) in the image's
        pixels: the points, then each box's corners (labels 2, 3)."""
        parts, labels = [], []
        if not _points(point_coords, point_labels, boxes is not None, "BxN", parts, labels) \
                and boxes is None:
            raise SamOnnxError("give prompts: point_coords with point_labels, and/or boxes")
        if boxes is not None:
            box = np.asarray(boxes, np.float64)
            rows = len(parts[0]) if parts else len(box)
            if box.shape != (rows, 4):
                raise SamOnnxError(f"boxes must be Bx4 (x0, y0, x1, y1), one per prompt; got "
                                   f"{box.shape}" + (f" for {rows} point prompts" if parts
                                                     else ""))
            parts.append(box.reshape(-1, 2, 2))
            labels.append(np.broadcast_to([2.0, 3.0], (rows, 2)))
        coords = np.concatenate(parts, axis=1)
        if not np.isfinite(coords).all():
            raise SamOnnxError("prompt coordinates contain NaN or Inf")
        return coords, np.concatenate(labels, axis=1)

    def _run(self, feed):
        # what check_feed looks at is the feed's names, dtypes and shapes: each is checked
        # once (0.4 ms of a 23 ms SAM 2 prompt, measured)
        kind = tuple((name, value.dtype, value.shape) for name, value in feed.items())
        if kind not in self._feeds_checked:
            problems = check_feed(self._decoder_graph, from_arrays(feed)).errors
            if problems:
                raise SamOnnxError(f"{problems[0].message}; {problems[0].fix}")
            self._feeds_checked.add(kind)
        names = list(self._outputs)
        if any(np.any(feed[name] != 0) for name in self._no_mask):  # a mask prompt
            if self._mask_decoder is None:
                self._mask_decoder = self._whole_session()
            outputs = self._mask_decoder.run(names, feed)
        else:
            takes = self.decoder.input_names
            outputs = self.decoder.run(names, {**{k: v for k, v in feed.items() if k in takes},
                                               **self._ahead})
        return {self._outputs[name]: value for name, value in zip(names, outputs)}

    def _select(self, low_res: np.ndarray, scores: np.ndarray, multimask_output: bool,
                rows: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The masks each prompt returns, as the family's predictor picks them: the three
        multimask outputs, or the single mask (SAM: the first token; SAM 2: the first when
        stable, else the best-scored multimask output); every mask when the graph chooses
        itself. ``rows``: which prompts ``low_res`` holds (all, by default)."""
        b, count = scores.shape
        rows = np.arange(b) if rows is None else rows
        if self._graph_selects:
            index = np.broadcast_to(np.arange(count), (b, count))
        elif count == 1:  # exported with one mask (ONNX Runtime's default SAM 2 decoder)
            if multimask_output:
                raise SamOnnxError(
                    f"this {self.decoder_contract.name} decoder returns one mask a prompt; pass "
                    "multimask_output=False, or export a decoder with the multimask outputs")
            index = np.zeros((b, 1), np.int64)
        elif count == 3:
            if not multimask_output:
                raise SamOnnxError(
                    f"this {self.decoder_contract.name} decoder returns only the three "
                    "multimask outputs; for multimask_output=False export the decoder with "
                    "--decoder-contract batched, which returns every mask")
            index = np.broadcast_to(np.arange(3), (b, 3))
        elif multimask_output:
            index = np.broadcast_to(np.arange(1, count), (b, count - 1))
        elif self.family.postprocess.single_mask == "dynamic_stability":
            post = self.family.postprocess
            best = 1 + np.argmax(scores[:, 1:], axis=1)
            single = np.zeros(b, np.int64)
            single[rows] = stability(low_res[:, 0], post.stability_delta) >= \
                post.stability_thresh
            index = np.where(single == 1, 0, best)[:, None]
        else:
            index = np.zeros((b, 1), np.int64)
        picked = np.take_along_axis(scores, index, axis=1)
        return low_res[np.arange(len(rows))[:, None], index[rows]], picked

    def _from_relative(self, point_coords, box):
        """Points and box given relative to the image (0..1) -> its pixels."""
        h, w = self.original_size
        if point_coords is not None:
            point_coords = np.asarray(point_coords, np.float64) * [w, h]
        if box is not None:
            box = np.asarray(box, np.float64).reshape(-1) * [w, h, w, h]
        return point_coords, box

    def _prompt(self, point_coords, point_labels, box):
        coords, lab = check_prompt(point_coords, point_labels, box, self.original_size)
        if box is None and not self.family.graph_pads:  # the padding point SamPredictor adds
            coords = np.concatenate([coords, [[0.0, 0.0]]])
            lab = np.concatenate([lab, [-1.0]])
        return self._apply_coords(coords), lab

    def _apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return transforms.apply_coords(coords, self.original_size, self.family.preprocess)

    def _feed(self, coords, labels, mask_input, pred_iou_thresh: float = EVERY_PROMPT,
              multimask_output: bool = True, hq_token_only: bool = False):
        """The decoder's inputs, by its contract, for (B, N, 2) coords in the 1024 frame."""
        takes = self.inputs
        if mask_input is not None and "mask_input" not in takes:
            raise SamOnnxError(f"this {self.decoder_contract.name} decoder takes no mask_input; "
                               "refine with an official or lowres decoder")
        if hq_token_only and "hq_token_only" not in takes:
            raise SamOnnxError(f"hq_token_only needs an HQ-SAM decoder; this is a "
                               f"{self.decoder_contract.name} decoder")
        values = {
            **self.encoded, **self._derived,
            "point_coords": coords.astype(np.float32),
            "point_labels": labels.astype(np.float32),
            **_mask_prompt(mask_input, self._low_res_size,
                           len(coords) if self._mask_rows else 1),
            "orig_im_size": np.array(self.original_size, np.float32),
            "pred_iou_thresh": self._iou_thresholds(pred_iou_thresh, multimask_output),
            "multimask_output": np.array([float(multimask_output)], np.float32),
            "hq_token_only": np.array([float(hq_token_only)], np.float32),
        }
        return self._typed(values, set(takes.values()))

    def _typed(self, values: Dict[str, np.ndarray], names) -> Dict[str, np.ndarray]:
        """The decoder inputs ``names`` from ``values`` (by this family's names), in the
        dtypes the graph declares."""
        return {name: np.asarray(values[canonical], self.decoder_contract.input(name).dtype)
                for canonical, name in self.inputs.items() if name in names}

    def _iou_thresholds(self, value: float, multimask_output: bool) -> np.ndarray:
        """A batched decoder's ``pred_iou_thresh``: one for every mask token (SAM's), or one a
        token (SAM 2's), the single-mask token's +inf when the multimask outputs are read:
        otherwise its score alone would have the graph upscale prompts whose masks are all
        dropped (random sam2.1 tiny weights: every prompt)."""
        name = self.inputs.get("pred_iou_thresh")
        shape = (1,) if name is None else self.decoder_contract.input(name).shape
        thresholds = np.full(shape, value, np.float32)
        if multimask_output and len(thresholds) > 1:
            thresholds[0] = np.inf
        return thresholds

    def _canonical(self, encoded: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Encoder outputs under the family's names (ONNX Runtime's SAM 2 encoder calls the
        image embedding image_embeddings, sam-onnx's image_embed)."""
        return {self.family.aliases.get(k, k): v for k, v in encoded.items()}


def _require_pair(encoder: onnx.ModelProto, decoder: onnx.ModelProto, names) -> None:
    """Refuse an encoder and decoder that do not belong together (another model's or size's
    embeddings decode into masks that mean nothing), as validate reports them."""
    errors = validate_pair(encoder, decoder, names).errors
    if errors:
        raise SamOnnxError(f"{errors[0].message}; {errors[0].fix}")

