"""lstm-bench: a load generator for lstm-stream, with an echo server as the transport baseline."""
