"""The full-size export beyond 2 GB, vit_h with random weights (vit_b's export is checked by
test_check_bench's vit_b test, through check --export-to)."""
import onnx
import pytest

import sam_onnx
from sam_onnx.graph.io import PROTOBUF_LIMIT


@pytest.mark.heavy
def test_vit_h_export_beyond_2gb_is_checked_end_to_end(tmp_path):
    result = sam_onnx.export("vit_h", random_weights=True, out_dir=tmp_path, decoder=False)
    encoder = result.graph("encoder")
    data = tmp_path / "vit_h_encoder.onnx.data"
    assert data.stat().st_size > PROTOBUF_LIMIT
    assert encoder.path.stat().st_size < 10 * 2**20  # the graph itself stays small
    assert encoder.parity.passed and encoder.parity.rows[0].ref_max_abs > 0
    onnx.checker.check_model(str(encoder.path))
