"""Developer tooling: embedded PostgreSQL and Valkey, the process supervisor, free ports, gRPC
code generation and the whole system as processes. Used by `wa run` (`make run`), the tests
and the benchmarks; no service imports it (tests/unit/test_layers.py)."""
