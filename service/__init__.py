"""lstm-stream's gRPC server: session table, batcher, ONNX Runtime, metrics."""
