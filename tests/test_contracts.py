import subprocess
import sys
from pathlib import Path

from sam_onnx.core.contracts import GraphContract
from sam_onnx.core.errors import SamOnnxError
from sam_onnx.families import CONTRACTS, get_contract
from sam_onnx.families.sam.contracts import DECODER_OFFICIAL

ROOT = Path(__file__).resolve().parents[1]


def test_official_decoder_is_segment_anythings_six_inputs():
    assert DECODER_OFFICIAL.input_names == (
        "image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
        "orig_im_size")
    assert DECODER_OFFICIAL.input("has_mask_input").shape == (1,)
    assert DECODER_OFFICIAL.input("orig_im_size").shape == (2,)
    assert all(t.dtype == "float32" for t in DECODER_OFFICIAL.inputs)


def test_lowres_decoder_takes_the_four_inputs_without_gating_or_size():
    lowres = get_contract("lowres")
    assert lowres.input_names == ("image_embeddings", "point_coords", "point_labels", "mask_input")
    assert lowres.output_names == ("low_res_masks", "iou_predictions")


def test_dynamic_axes_come_from_symbolic_dims():
    axes = DECODER_OFFICIAL.dynamic_axes()
    assert axes["point_coords"] == {1: "num_points"}
    assert axes["point_labels"] == {1: "num_points"}
    assert axes["masks"] == {2: "image_height", 3: "image_width"}
    assert "image_embeddings" not in axes


def test_contracts_round_trip_through_plain_data():
    for contract in CONTRACTS.values():
        assert GraphContract.from_dict(contract.to_dict()) == contract


def test_unknown_contract_names_the_known_ones():
    try:
        get_contract("samexporter")
    except SamOnnxError as exc:
        assert "official" in str(exc) and "lowres" in str(exc)
    else:
        raise AssertionError("no error")


def test_contract_docs_are_generated_from_the_declarations():
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "contract_docs.py")],
                               capture_output=True, text=True, check=True).stdout
    assert (ROOT / "docs" / "contracts.md").read_text() == generated
