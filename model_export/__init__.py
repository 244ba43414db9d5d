"""The LSTM reference model, its parameter files and the ONNX exporter."""

__version__ = "0.1.0"
