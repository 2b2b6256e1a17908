"""torch -> ONNX per sub-network, validation against PyTorch, the manifest, TensorRT engines."""
