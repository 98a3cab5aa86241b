"""Metering: usage records, the durable ledger, and the upload to the billing endpoint."""
