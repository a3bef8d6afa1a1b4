"""The contract and provenance each exported graph carries in its ONNX metadata_props.

Keys are prefixed ``sam_onnx.``; structured values are JSON strings.  Readers need only
the graph's protobuf, never its external weights.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import onnx

from ..backend import installed_packages
from ..backend import onnxruntime as ort
from ..core.contracts import GraphContract
from ..families import FAMILIES, family_of

PREFIX = "sam_onnx."
_JSON_KEYS = {"contract_spec", "preprocess", "postprocess", "versions", "repairs"}


def provenance(contract: GraphContract, *, model_type: str, weights_source: str,
               weights_checksum: str, exporter: str, opset: int, precision: str = "fp32") -> Dict:
    """Everything recorded about one graph, as plain data."""
    return {
        "role": contract.role,
        "model_type": model_type,
        "contract": contract.name,
        "contract_spec": contract.to_dict(),
        "family": family_of(model_type).name,
        "preprocess": asdict(family_of(model_type).preprocess),
        "postprocess": asdict(family_of(model_type).postprocess),
        "weights": weights_checksum,
        "weights_source": weights_source,
        "random_weights": weights_checksum == "random",
        "precision": precision,
        "exporter": exporter,
        "opset": opset,
        "versions": library_versions(),
    }


def library_versions() -> Dict[str, str]:
    """Installed versions (each family's model code among them); for ONNX Runtime, only the
    build that ``import onnxruntime`` loads (the others are shadowed and never run)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    codes = dict.fromkeys(f.torch_requires[1][1] for f in FAMILIES.values())  # model code
    for dist in ("sam-onnx", "torch", "onnx", "onnxscript", *codes):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    imported = installed_packages().get("imported", "onnxruntime")
    out[imported] = ort.__version__
    return out


def write(model: onnx.ModelProto, record: Dict) -> None:
    """Set the ``sam_onnx.*`` entries of ``model`` in place, replacing earlier ones."""
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in record.items():
        structured = key in _JSON_KEYS or not isinstance(value, str)
        text = json.dumps(value, sort_keys=True) if structured else value
        model.metadata_props.add(key=PREFIX + key, value=text)


def read(model: onnx.ModelProto) -> Dict:
    """The ``sam_onnx.*`` entries as plain data; empty for graphs sam-onnx did not write."""
    out = {}
    for p in model.metadata_props:
        if p.key.startswith(PREFIX):
            key = p.key[len(PREFIX):]
            try:
                out[key] = json.loads(p.value) if key in _JSON_KEYS or key in (
                    "random_weights", "opset") else p.value
            except json.JSONDecodeError:
                out[key] = p.value
    return out


def recorded_contract(model: onnx.ModelProto) -> Optional[GraphContract]:
    """The contract the exporter recorded, or None when absent or unreadable."""
    spec = read(model).get("contract_spec")
    try:
        return GraphContract.from_dict(spec) if isinstance(spec, dict) else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def stamp(path: Path, contract: GraphContract, record: Dict) -> None:
    """Record the contract and provenance, and name the output dims as the contract declares
    them (exporters leave generated names); the weights in external data are not loaded."""
    model = onnx.load(str(path), load_external_data=False)
    write(model, record)
    declared = {t.name: t for t in contract.outputs}
    for out in model.graph.output:
        if out.name in declared:
            dims = out.type.tensor_type.shape.dim
            del dims[:]
            for d in declared[out.name].shape:
                dims.add(**({"dim_param": d} if isinstance(d, str) else {"dim_value": d}))
    model.graph.doc_string = contract.doc
    onnx.save(model, str(path))
