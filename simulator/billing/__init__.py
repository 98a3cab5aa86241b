"""A local billing endpoint implementing Billing API v1, with fault injection."""

from simulator.billing.server import BillingSimulator, KeyInfo

__all__ = ["BillingSimulator", "KeyInfo"]
