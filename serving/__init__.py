"""Hybrid serving: CPU embedding shard servers (NumPy + gRPC, no JAX), their client,
the raw-bytes echo floor, and (later) the ranker service.

Wire contract: ``serving/protos/embedding.proto``.
"""
