"""Custom operators of the ``onnx_snn`` domain."""
