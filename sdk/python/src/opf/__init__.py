"""Python SDK of the Operator Plugin Framework.

Serve ordinary grpcio servicers to a Kubernetes operator through the tunnel
the plugin opens to it (docs/tunnel-spec.md, protocol version 2)::

    plugin = opf.Plugin("validator", version="v1.0.0", target="unix:///run/opf/op.sock")
    demo_pb2_grpc.add_ValidatorServiceServicer_to_server(Validator(), plugin)
    await plugin.serve()
"""

from opf._context import Context, SyncContext
from opf._metadata import Metadatum
from opf._options import (
    SERVICE_ACCOUNT_TOKEN_PATH,
    TLS,
    Backoff,
    TokenSource,
    service_account_token,
    static_token,
    token_file,
)
from opf._plugin import ConfigurationError, NotRegisteredError, Plugin, RegistrationRejected
from opf._status import CallError

__all__ = [
    "SERVICE_ACCOUNT_TOKEN_PATH",
    "TLS",
    "Backoff",
    "CallError",
    "ConfigurationError",
    "Context",
    "Metadatum",
    "NotRegisteredError",
    "Plugin",
    "RegistrationRejected",
    "SyncContext",
    "TokenSource",
    "service_account_token",
    "static_token",
    "token_file",
]

__version__ = "0.1.0"
