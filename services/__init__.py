"""The four services; each owns its domain and its tables."""
