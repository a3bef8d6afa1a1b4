"""What a model family declares, in one place: its model names and checkpoints, how a
checkpoint is recognised, its graphs' contracts, its pre- and post-processing, and where its
PyTorch side lives.

Everything here is data the torch-free runtime, validate and repair read. The PyTorch side
(builders, export wrappers and patches, the reference path check and the exporter compare
against) is a module of the family's own, named by ``torch_side`` and imported only by the
exporter and the tools that compare with PyTorch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType
from typing import Callable, Collection, Dict, FrozenSet, Mapping, Optional, Tuple

import numpy as np

from ..core.contracts import GraphContract, Postprocess, Preprocess
from ..core.errors import CheckpointError, SamOnnxError

#: The extra that installs every family's PyTorch side.
EXPORT_EXTRA = "sam-onnx[export]"


@dataclass(frozen=True)
class Family:
    name: str
    doc: str
    #: Model name -> the official checkpoint's file name (None: no published weights).
    checkpoints: Mapping[str, Optional[str]]
    #: Where the official checkpoints are downloaded from (file names appended).
    checkpoint_url: str
    #: By contract name: the encoder's, then the decoders'.
    contracts: Mapping[str, GraphContract]
    preprocess: Preprocess
    postprocess: Postprocess
    #: Tensor names every checkpoint of the family has: how the registry tells families apart.
    keys: Tuple[str, ...]
    #: (state_dict with ``keys``, where it came from) -> model name, or a CheckpointError
    #: saying what it is; reads tensor names and shapes only (no torch needed).
    identify: Callable[[Mapping, Path], str]
    #: The module of builders, export wrappers and the PyTorch reference.
    torch_side: str
    #: The Python modules the PyTorch side needs, and the pip package of each: torch, then
    #: the family's own model code (``code``), then what that needs.
    torch_requires: Tuple[Tuple[str, str], ...]
    #: SAM's decoder form names (official, batched...) -> this family's contract for that form,
    #: where its contracts have names of their own.
    decoder_forms: Mapping[str, str] = field(default_factory=dict)
    #: Encoder forms (``--encoder-contract image``) -> this family's contract for each, beside
    #: ``tensor``, the pre-processed tensor every family's encoder takes.
    encoder_forms: Mapping[str, str] = field(default_factory=dict)
    #: Model name -> its official checkpoint's published MD5, where one is published
    #: (segment-anything's file names carry its first six hex digits): a download or a
    #: cached file that differs is refused or replaced.
    checkpoint_md5: Mapping[str, str] = field(default_factory=dict)
    #: The decoder graphs append the padding point (label -1) themselves, after every prompt,
    #: as SAM 2's prompt encoder and samexporter's graphs do; else the caller adds it to a
    #: prompt without a box (SamPredictor).
    graph_pads: bool = False
    #: Other tools' tensor names -> this family's, for feeding graphs of either naming.
    aliases: Mapping[str, str] = field(default_factory=dict)
    #: Contracts declared to recognise and run other tools' graphs, never exported.
    recognised_only: Tuple[str, ...] = ()
    #: The encoder output that is the image embedding (SamPredictor.features).
    embedding: str = "image_embeddings"
    #: The automatic mask generator's defaults where the family's own generator differs
    #: from segment_anything's (SAM2AutomaticMaskGenerator: pred_iou_thresh 0.8).
    generator_defaults: Mapping[str, object] = field(default_factory=dict)
    #: Decoder inputs made from an encoder output once an image, numpy only: name -> (that
    #: output, the function making it). SAM 2's batched decoder takes its high-resolution
    #: maps in the upscaler's block order.
    derived_inputs: Mapping[str, Tuple[str, Callable[[np.ndarray], np.ndarray]]] = \
        field(default_factory=dict)

    def derive_inputs(self, encoded: Mapping[str, np.ndarray],
                      names: Collection[str]) -> Dict[str, np.ndarray]:
        """The ``derived_inputs`` among a decoder's input ``names``, made from ``encoded``
        (the encoder's outputs by this family's names)."""
        return {name: make(encoded[source]) for name, (source, make) in
                self.derived_inputs.items() if name in names}

    @property
    def image_inputs(self) -> FrozenSet[str]:
        """The decoder inputs, by this family's names, that come from the image: every
        encoder's outputs and what is derived from them (the rest come with a prompt)."""
        return frozenset({self.aliases.get(name, name) for c in self.contracts.values()
                          if c.role == "encoder" for name in c.output_names} |
                         set(self.derived_inputs))

    @property
    def models(self) -> Tuple[str, ...]:
        return tuple(self.checkpoints)

    @property
    def code(self) -> str:
        """The module of the family's own model code, which check and bench compare with."""
        return self.torch_requires[1][0]

    @property
    def encoder(self) -> GraphContract:
        """The encoder contract sam-onnx exports."""
        return next(c for name, c in self.contracts.items()
                    if c.role == "encoder" and name not in self.recognised_only)

    @property
    def decoder_contracts(self) -> Tuple[str, ...]:
        return tuple(n for n, c in self.contracts.items() if c.role == "decoder")

    @property
    def exported_decoders(self) -> Tuple[str, ...]:
        return tuple(n for n in self.decoder_contracts if n not in self.recognised_only)

    def decoder_contract(self, name: str) -> str:
        """The family's decoder contract for ``name``: its own contract name, or a form of
        SAM's (``--decoder-contract official`` exports HQ-SAM's hq_official)."""
        if name in self.recognised_only:
            raise SamOnnxError(f"{name} is another tool's form, which sam-onnx recognises and "
                               f"runs but does not export; export one of: "
                               f"{', '.join(self.exported_decoders)}")
        if name in self.decoder_contracts:
            return name
        if name in self.decoder_forms:
            return self.decoder_forms[name]
        known = ", ".join(dict.fromkeys([*self.decoder_forms, *self.exported_decoders]))
        raise SamOnnxError(f"the {self.name} family has no {name!r} decoder; use one of: "
                           f"{known}")

    def encoder_contract(self, form: str) -> GraphContract:
        """The encoder contract for ``form``: ``tensor`` (the family's encoder), or a form it
        declares (``image``: the pre-processing inside the graph)."""
        if form == "tensor":
            return self.encoder
        if form in self.encoder_forms:
            return self.contracts[self.encoder_forms[form]]
        raise SamOnnxError(f"the {self.name} family has no {form!r} encoder; use one of: "
                           f"{', '.join(['tensor', *self.encoder_forms])}")

    def require_torch(self) -> None:
        """Fail in one line, naming the extra to install, when the PyTorch side cannot be
        imported; imports nothing itself (a benchmark's parent stays torch-free)."""
        missing = [pip for module, pip in self.torch_requires if find_spec(module) is None]
        if missing:
            raise SamOnnxError(
                f"this needs PyTorch and the {self.name} model code ({', '.join(missing)} "
                f"not installed); pip install '{EXPORT_EXTRA}'")

    def torch(self) -> ModuleType:
        """The PyTorch side, or a one-line error naming the extra to install."""
        self.require_torch()
        return importlib.import_module(self.torch_side)


def load_strict(model, state: Mapping, model_type: str, assign: bool = False):
    """``model.load_state_dict(state, strict=True)`` for a family's builder, a checkpoint that
    does not fit refused in one line naming its first difference; the model, for eval."""
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"the checkpoint does not fit {model_type}: {first}") from None
    return model.eval()


def by_name(items: Dict[str, object], name: str, what: str):
    """``items[name]``, or a one-line error listing the names there are."""
    try:
        return items[name]
    except KeyError:
        raise SamOnnxError(f"unknown {what} {name!r}; use one of: {', '.join(items)}") from None
