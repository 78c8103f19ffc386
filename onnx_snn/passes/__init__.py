"""Graph passes, each a module with one entry point (a ``Pass`` subclass) and a test module
``tests/passes/test_<module>.py``; ``onnx_snn.converter.Converter.passes`` lists them in order."""
