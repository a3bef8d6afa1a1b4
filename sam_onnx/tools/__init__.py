"""What each command does: validate (with ``--run``), repair, check, bench, segment, doctor.
Only ``sam_onnx.cli`` and ``sam_onnx/__init__`` import these."""
