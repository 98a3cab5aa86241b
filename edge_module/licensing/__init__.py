"""Licensing: statuses, signed leases, a tamper-resistant clock, the grace state machine."""
