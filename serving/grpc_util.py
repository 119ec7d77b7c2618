"""gRPC plumbing shared by the embedding shard server and the ranker service.

Imports gRPC and the standard library only (the shard servers stay JAX-free).
"""

from __future__ import annotations

import grpc


def check_tls_pair(tls_cert: str | None, tls_key: str | None) -> None:
    """Raises ValueError unless both or neither of a server's TLS files are given."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key must be given together")


def bind(
    server: grpc.Server, address: str, *, tls_cert: str | None = None, tls_key: str | None = None
) -> int:
    """Binds ``address`` (``host:port``), TLS only when a certificate is given.

    Args:
      server: the not yet started server.
      address: ``host:port``; port 0 picks a free one.
      tls_cert: PEM certificate (chain) file; with ``tls_key``, the port speaks TLS only.
      tls_key: PEM private key file.

    Returns:
      The bound port.

    Raises:
      OSError: the address cannot be bound (in use, no such interface) or a
        TLS file cannot be read.
    """
    check_tls_pair(tls_cert, tls_key)
    try:  # gRPC raises (newer releases) or returns 0 when it cannot bind
        if tls_cert is not None:
            with open(tls_key, "rb") as f:
                key = f.read()
            with open(tls_cert, "rb") as f:
                cert = f.read()
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"could not bind {address} (in use, or no such interface): {e}") from None
    if port == 0:
        raise OSError(f"could not bind {address} (in use, or no such interface)")
    return port


def channel(
    address: str, *, root_certificates: bytes | None = None, options=()
) -> grpc.Channel:
    """A channel to ``address``: TLS verified against ``root_certificates`` (PEM), else plaintext."""
    if root_certificates:
        creds = grpc.ssl_channel_credentials(root_certificates)
        return grpc.secure_channel(address, creds, options=list(options))
    return grpc.insecure_channel(address, options=list(options))
