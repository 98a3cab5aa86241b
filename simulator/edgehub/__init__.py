"""A cloud-free edgeHub for tests and local runs: see ``hub.py``."""

from simulator.edgehub.hub import FakeEdgeHub, OutputMessage, free_loopback_address

__all__ = ["FakeEdgeHub", "OutputMessage", "free_loopback_address"]
