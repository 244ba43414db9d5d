"""The APIs: gRPC servicers that convert messages to data-plane calls and back."""
