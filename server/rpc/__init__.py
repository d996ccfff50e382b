"""gRPC transport: servicer, interceptors and create_server()."""
