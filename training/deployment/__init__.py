"""Deployment: the forward exported to ONNX (``onnx_export``) and run in onnxruntime in place of the PyTorch model
(``onnx_runtime``)."""
