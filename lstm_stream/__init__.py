"""Generated gRPC/protobuf stubs of the lstm-stream API (``make proto``)."""
