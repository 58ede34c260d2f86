"""The four services; each owns its domain and its tables."""

import os

# gRPC's C core writes log lines of its own on stderr, not JSON: at its default verbosity one
# for every failed TLS handshake (any caller without a certificate of the system's CA). Only
# its errors are kept; the services log everything else themselves, as JSON lines
# (common/logs.py). gRPC reads this when it loads, so it is set here, before any service
# imports it; a value set in the environment wins.
if not os.environ.get("GRPC_VERBOSITY"):
    os.environ["GRPC_VERBOSITY"] = "ERROR"
