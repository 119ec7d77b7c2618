"""Bounds on serving settings, in a module of its own (standard library only) so that
the settings rules (`serving.check_rules`, which run_pipeline checks up front) name
them without loading gRPC and protobuf through `serving.grpc_util`.
"""

from __future__ import annotations

# The longest duration a server setting may hold (deadlines, waits, windows, periods).
MAX_SECONDS = 86400.0
