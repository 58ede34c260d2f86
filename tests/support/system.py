"""The whole system as processes for the tests: it lives in `devtools.system`, shared with
bench/."""

from devtools.system import ACCESS_TOKEN, SECRET, SERVICES, VERIFY_TOKEN, System

__all__ = ["ACCESS_TOKEN", "SECRET", "SERVICES", "VERIFY_TOKEN", "System"]
