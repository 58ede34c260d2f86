"""Plumbing shared by every service: configuration, logging, telemetry, gRPC bootstrap, database."""
