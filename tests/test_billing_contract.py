"""The OpenAPI contract, the client, the simulator and the records agree."""

from __future__ import annotations

import json
from pathlib import Path

from edge_module.billing_api import ApiStatus, BillingClient, parse_retry_after
from edge_module.metering.records import RECORD_FIELDS
from simulator.billing import BillingSimulator, KeyInfo
from simulator.billing.server import MODES
from tests.support import API_KEY

SPEC = json.loads((Path(__file__).resolve().parent.parent / "docs" /
                   "billing-api.openapi.json").read_text())
IDENTITY = {"containerType": "edge-module", "containerVersion": "0.1.0", "containerId": "c"}


def test_spec_paths_and_record_fields_match_the_code() -> None:
    assert set(SPEC["paths"]) == {"/billing/v1/status", "/billing/v1/usage",
                                  "/billing/v1/license", "/billing/v1/reconcile"}
    record = SPEC["components"]["schemas"]["UsageRecord"]
    assert set(record["required"]) == set(RECORD_FIELDS)
    problems = set(SPEC["components"]["schemas"]["Problem"]["properties"]["status"]["enum"])
    assert problems | {"Valid", "CouldNotConnect"} == {s.value for s in ApiStatus}


def test_every_status_the_simulator_gives_maps_to_the_azure_status(
    billing: BillingSimulator
) -> None:
    billing.state.keys["revoked"] = KeyInfo(revoked=True)
    billing.state.keys["tiny"] = KeyInfo(quota=0)
    cases = {API_KEY: ApiStatus.VALID, "unknown": ApiStatus.INVALID,
             "other-type-key": ApiStatus.MISMATCH, "revoked": ApiStatus.UNAUTHORIZED,
             "tiny": ApiStatus.OUT_OF_QUOTA}
    for key, expected in cases.items():
        answer = BillingClient(billing.url, key, timeout=5).status(IDENTITY)
        assert answer.status is expected, key
    client = BillingClient(billing.url, API_KEY, timeout=5)
    billing.set_fault("busy", retry_after=7)
    busy = client.status(IDENTITY)
    assert busy.status is ApiStatus.BUSY and busy.retry_after == 7
    billing.set_fault("error500")
    assert client.status(IDENTITY).status is ApiStatus.UNKNOWN
    billing.set_fault("refuse")
    assert client.status(IDENTITY).status is ApiStatus.COULD_NOT_CONNECT
    billing.set_fault("none")
    assert client.status(IDENTITY).server_date is not None
    assert {"refuse", "blackhole", "busy", "quota", "slow", "error500", "drop"} <= MODES


def test_quota_is_enforced_per_key(billing: BillingSimulator) -> None:
    billing.state.keys["q5"] = KeyInfo(quota=5)
    client = BillingClient(billing.url, "q5", timeout=5)
    record = {**IDENTITY, "meter": {"name": "m", "quantity": 3}, "requestTime": 1_900_000_000_000,
              "apiType": "t"}
    first = client.usage([{**record, "id": "a"}])
    assert first.ok and first.body["results"][0]["status"] == "Accepted"
    second = client.usage([{**record, "id": "b"}])
    assert second.status is ApiStatus.OUT_OF_QUOTA
    again = client.usage([{**record, "id": "a"}])  # a resend costs no quota
    assert again.body["results"][0]["status"] == "Duplicate"


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("5") == 5
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None


def test_lease_and_license_fields_in_the_spec_match_what_is_signed(
    billing: BillingSimulator
) -> None:
    schemas = SPEC["components"]["schemas"]
    lease = billing.lease("c-1", "edge-module")
    assert lease is not None
    assert set(schemas["Lease"]["required"]) <= set(lease)
    assert set(lease) <= set(schemas["Lease"]["properties"])
    status, answer = billing.license(API_KEY, {"containerType": "edge-module",
                                               "containerId": "c-1", "modulePublicKey": "k"})
    assert status == 200
    assert set(schemas["License"]["required"]) <= set(answer["license"])
