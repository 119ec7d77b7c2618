"""Generated protobuf/gRPC code for ``embedding.proto`` (committed; regenerate with the
command in the .proto header, tests/test_serving_proto.py checks it is fresh)."""
