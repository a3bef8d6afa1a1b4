"""Full-size exports with random weights: vit_b, and vit_h for the beyond-2 GB path."""
import onnx
import pytest

import sam_onnx
from sam_onnx.graph import metadata
from sam_onnx.graph.io import PROTOBUF_LIMIT


def test_vit_b_export_passes_its_checks(tmp_path):
    result = sam_onnx.export("vit_b", random_weights=True, out_dir=tmp_path)
    encoder, decoder = result.graph("encoder"), result.graph("decoder")
    assert encoder.parity.passed and decoder.parity.passed
    assert {r.feed for r in decoder.parity.rows} == {"points+mask@534x800", "box+point@1200x1800"}
    assert metadata.read(onnx.load(str(encoder.path), load_external_data=False))["model_type"] \
        == "vit_b"


@pytest.mark.heavy
def test_vit_h_export_beyond_2gb_is_checked_end_to_end(tmp_path):
    result = sam_onnx.export("vit_h", random_weights=True, out_dir=tmp_path, decoder=False)
    encoder = result.graph("encoder")
    data = tmp_path / "vit_h_encoder.onnx.data"
    assert data.stat().st_size > PROTOBUF_LIMIT
    assert encoder.path.stat().st_size < 10 * 2**20  # the graph itself stays small
    assert encoder.parity.passed and encoder.parity.rows[0].ref_max_abs > 0
    onnx.checker.check_model(str(encoder.path))
