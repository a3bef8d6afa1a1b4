"""What every layer shares: errors, the contract types, atomic files, fresh processes, logging,
stage timing and parity. Imports nothing of onnx, onnxruntime or torch."""
