"""Other tools' SAM graphs, made by those tools' own code and run the way those tools run them,
for ``sam-onnx bench --peers``: the same weights, image and prompt as the PyTorch and sam-onnx
rows, in the same alternating run.

* ``official``: segment-anything's ``scripts/export_onnx_model.py`` as written (its
  ``SamOnnxModel``, four masks, its dummy inputs and dynamic axes, the TorchScript exporter at
  opset 17), run as its ONNX notebook runs it: ``SamPredictor.set_image`` in PyTorch for the
  embedding, the decoder in ONNX Runtime with the notebook's feed, masks thresholded at 0.
* ``samexporter``: samexporter 0.5's documented flow (``export_encoder --use-preprocess``: its
  ``ImageEncoderOnnxModel``; ``export_decoder --return-single-mask``: segment-anything's
  ``SamOnnxModel``; both at its default opset 18, TorchScript exporter), run by its own
  ``SegmentAnythingONNX`` (``encode``, ``predict_masks``), the runner AnyLabeling's came from.
  samexporter pins torch 2.10 and onnx 1.20, so it is not an extra of ours: install it beside
  them with ``pip install --no-deps samexporter==0.5.0`` (its code needs nothing more).

A peer whose code is not importable is reported "not installed", never run in another form.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..core.errors import SamOnnxError
from ..core.files import Staging

#: Pixel statistics both tools' wrappers are given (segment-anything's).
_MEAN, _STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


@dataclass(frozen=True)
class Peer:
    name: str
    doc: str
    #: (module, how to install it): what must be importable to make and run its graphs.
    requires: Tuple[Tuple[str, str], ...]
    #: The graph files it writes, by role.
    files: Dict[str, str]
    #: (sam, folder) -> writes ``files`` there, with the tool's own code (needs torch).
    make: Callable
    #: (graph paths, model_type, checkpoint, random_weights) -> an object with the bench's
    #: encode / prompt / masks methods, run the tool's way.
    open: Callable

    def missing(self) -> Optional[str]:
        """Why it cannot run here (a one-line install hint), or None."""
        absent = [how for module, how in self.requires if find_spec(module) is None]
        return None if not absent else "not installed (" + "; ".join(absent) + ")"


# -- official: segment-anything's export script and ONNX notebook --------------------------
def _official_dummy_inputs(sam):
    """The export script's dummy inputs (orig_im_size 1500x2250, five points)."""
    import torch

    embed_dim = sam.prompt_encoder.embed_dim
    embed_size = sam.prompt_encoder.image_embedding_size
    mask_input_size = [4 * x for x in embed_size]
    return {
        "image_embeddings": torch.randn(1, embed_dim, *embed_size, dtype=torch.float),
        "point_coords": torch.randint(low=0, high=1024, size=(1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *mask_input_size, dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }


def official_decoder(sam, path, single: bool = False, opset: int = 17) -> None:
    """segment-anything's SamOnnxModel exported as its scripts/export_onnx_model.py does
    (``--return-single-mask``: ``single``), and samexporter's export_decoder (opset 18)."""
    import torch
    from segment_anything.utils.onnx import SamOnnxModel

    model = SamOnnxModel(sam, return_single_mask=single)
    dummy = _official_dummy_inputs(sam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(dummy.values()), str(path), export_params=True,
                          opset_version=opset, do_constant_folding=True,
                          input_names=list(dummy), dynamo=False,
                          output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"},
                                        "point_labels": {1: "num_points"}})


def _make_official(sam, folder: Path) -> None:
    official_decoder(sam, folder / OFFICIAL.files["decoder"])


class _Notebook:
    """segment-anything's onnx_model_example notebook: PyTorch's SamPredictor for the
    embedding, the ONNX decoder for the prompt."""

    def __init__(self, graphs, model_type, checkpoint, random_weights) -> None:
        from segment_anything import SamPredictor

        from ..backend import onnxruntime as ort
        from ..exporter.checkpoints import load_weights

        sam = load_weights(model_type, checkpoint, random_weights=random_weights,
                           progress=False).sam
        self.predictor = SamPredictor(sam)
        # the notebook's own plain session, not sam-onnx's (runtime.sessions): its way
        self.session = ort.InferenceSession(str(graphs["decoder"]),
                                            providers=["CPUExecutionProvider"])
        self.threshold = sam.mask_threshold

    def encode(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)
        self.embedding = self.predictor.get_image_embedding().cpu().numpy()

    def prompt(self, point: np.ndarray) -> np.ndarray:
        coords = np.concatenate([point, np.array([[0.0, 0.0]])])[None, :, :]
        labels = np.array([[1, -1]], np.float32)
        coords = self.predictor.transform.apply_coords(coords, self.predictor.original_size)
        masks, _, _ = self.session.run(None, {
            "image_embeddings": self.embedding,
            "point_coords": coords.astype(np.float32), "point_labels": labels,
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(self.predictor.original_size, np.float32)})
        return masks[0] > self.threshold

    masks = prompt

    @staticmethod
    def gemm_engine() -> str:
        return "torch"


# -- samexporter: its exports and its own inference class ----------------------------------
def _make_samexporter(sam, folder: Path) -> None:
    import torch
    from samexporter.onnx_utils import ImageEncoderOnnxModel

    encoder = ImageEncoderOnnxModel(model=sam, use_preprocess=True, pixel_mean=_MEAN,
                                    pixel_std=_STD)
    size = sam.image_encoder.img_size
    with warnings.catch_warnings():  # export_encoder.run_export's call, as written
        warnings.simplefilter("ignore")
        torch.onnx.utils.export(encoder, (torch.randn((size, size, 3), dtype=torch.float),),
                                str(folder / SAMEXPORTER.files["encoder"]), export_params=True,
                                verbose=False, opset_version=18, do_constant_folding=True,
                                input_names=["input_image"], output_names=["image_embeddings"],
                                dynamic_axes={"input_image": {0: "image_height",
                                                              1: "image_width"}})
    official_decoder(sam, folder / SAMEXPORTER.files["decoder"], single=True, opset=18)


class _SegmentAnythingONNX:
    """samexporter's SegmentAnythingONNX, fed as its inference script feeds it (a BGR
    image, a point prompt), on the CPU provider."""

    def __init__(self, graphs, *_) -> None:
        from samexporter.sam_onnx import SegmentAnythingONNX

        self.model = SegmentAnythingONNX(str(graphs["encoder"]), str(graphs["decoder"]),
                                         ["CPUExecutionProvider"])

    def encode(self, image: np.ndarray) -> None:
        self.embedding = self.model.encode(np.ascontiguousarray(image[..., ::-1]))

    def prompt(self, point: np.ndarray) -> np.ndarray:
        x, y = (float(v) for v in point[0])
        masks = self.model.predict_masks(self.embedding, [{"type": "point", "data": [x, y],
                                                           "label": 1}])
        return masks[0] > 0.0

    masks = prompt

    @staticmethod
    def gemm_engine() -> str:
        return "onnxruntime"


OFFICIAL = Peer(
    name="official",
    doc="segment-anything's export script (four masks) run as its ONNX notebook: the "
    "embedding from PyTorch's SamPredictor, the decoder on ONNX Runtime",
    requires=(("segment_anything", "pip install 'sam-onnx[export]'"),
              ("torch", "pip install 'sam-onnx[export]'")),
    files={"decoder": "official_decoder.onnx"},
    make=_make_official,
    open=_Notebook,
)
SAMEXPORTER = Peer(
    name="samexporter",
    doc="samexporter 0.5's --use-preprocess encoder and --return-single-mask decoder, run by "
    "its SegmentAnythingONNX",
    requires=(("samexporter", "pip install --no-deps samexporter==0.5.0"),
              ("cv2", "pip install opencv-python-headless"),
              ("segment_anything", "pip install 'sam-onnx[export]'")),
    files={"encoder": "samexporter_encoder.onnx", "decoder": "samexporter_decoder.onnx"},
    make=_make_samexporter,
    open=_SegmentAnythingONNX,
)
PEERS: Dict[str, Peer] = {p.name: p for p in (OFFICIAL, SAMEXPORTER)}


def parse(names: str) -> Tuple[Peer, ...]:
    """``--peers official,samexporter`` -> the peers, or a one-line error naming them."""
    chosen = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in PEERS:
            raise SamOnnxError(f"unknown peer {name!r}; use one or more of: {', '.join(PEERS)}")
        chosen.append(PEERS[name])
    return tuple(chosen)


def graphs(peer: Peer, model_type: str, checkpoint, random_weights: bool, checksum: str,
           folder: Path) -> Dict[str, Path]:
    """The peer's graphs for these weights under ``folder/<peer>/``: made once (in a fresh
    process: the exports hold the model in memory), reused while the weights are the same."""
    from ..core.processes import run_fresh

    where = folder / peer.name
    stamp = where / "made_from.json"
    made_from = {"model_type": model_type, "weights": checksum}
    paths = {role: where / name for role, name in peer.files.items()}
    if _read_stamp(stamp) == made_from and all(p.exists() for p in paths.values()):
        return paths
    where.mkdir(parents=True, exist_ok=True)
    with Staging(where) as staging:
        run_fresh(_make, peer.name, model_type, checkpoint, random_weights, staging.dir,
                  died=f"making {peer.name}'s graphs died (out of memory?)")
        (staging.dir / stamp.name).write_text(json.dumps(made_from) + "\n")
        staging.commit(p.name for p in staging.dir.iterdir())
    return paths


def _read_stamp(path: Path) -> Optional[dict]:
    """What the graphs there were made from, or None (none made, or a stamp not ours)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _make(name: str, model_type: str, checkpoint, random_weights: bool, folder: Path) -> None:
    from ..exporter.checkpoints import load_weights

    sam = load_weights(model_type, checkpoint, random_weights=random_weights, progress=False).sam
    PEERS[name].make(sam, Path(folder))
