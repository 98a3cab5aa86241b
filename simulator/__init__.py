"""Local stand-ins for what a device talks to: a publisher app (and, later, billing and edgeHub)."""
