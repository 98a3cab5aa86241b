"""HTTP API: health, readiness, metrics (and later status and usage logs)."""
