"""gRPC reward server: engine, batcher, RPC layer, metrics and the `grm-serve` CLI."""
