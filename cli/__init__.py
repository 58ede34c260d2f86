"""`wa`: the operator's command line (run, simulate, dlq, health, stats, trace, migrate)."""
