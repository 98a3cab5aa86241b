"""Transports: where messages come from and where results go (MQTT, edgeHub)."""
