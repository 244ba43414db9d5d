"""lstm_stream.v1: the native API (proto/lstm_stream/v1/lstm_stream.proto)."""
