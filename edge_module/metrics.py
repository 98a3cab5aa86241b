"""Prometheus metrics of one module instance, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_in = Counter("edge_module_messages_received", "Input messages taken in.",
                                   registry=r)
        self.results_out = Counter("edge_module_results_published",
                                   "Result envelopes sent.", registry=r)
        self.items_inferred = Counter("edge_module_items_inferred",
                                      "Items (images or tensor rows) run through the model.",
                                      registry=r)
        self.errors = Counter("edge_module_errors", "Error envelopes sent, by code.", ["code"],
                              registry=r)
        self.publish_failures = Counter(
            "edge_module_publish_failures",
            "Sends the transport could not hand to the broker (QoS 0 while disconnected).",
            registry=r)
        self.send_retries = Counter(
            "edge_module_send_retries",
            "Answers sent again because edgeHub did not acknowledge them in time or the link "
            "was down.", registry=r)
        self.results_undelivered = Counter(
            "edge_module_results_undelivered",
            "Answers given up after EdgeHub:SendRetrySeconds (each is logged with its id).",
            registry=r)
        self.answers_in_flight = Gauge(
            "edge_module_answers_in_flight",
            "Answers handed to edgeHub and not yet acknowledged (sent or waiting to be sent "
            "again).", registry=r)
        self.twin_updates = Counter(
            "edge_module_twin_updates", "Desired-property changes, by outcome.", ["outcome"],
            registry=r)
        self.method_calls = Counter(
            "edge_module_method_calls", "Direct method calls, by method and status.",
            ["method", "status"], registry=r)
        self.decode_seconds = Histogram("edge_module_decode_seconds",
                                        "Time to decode one message.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("edge_module_inference_seconds",
                                           "Time of one session.run (one batch).",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("edge_module_queue_seconds",
                                       "Time from receipt until inference starts.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram("edge_module_end_to_end_seconds",
                                            "Time from receipt until the answer is sent.",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("edge_module_batch_size", "Items per session.run.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.model_state = Gauge(
            "edge_module_model_state",
            "1 for the state each model version is in (loading, ready, failed, unloaded).",
            ["model", "version", "state"], registry=r)
        self.intake_depth = Gauge("edge_module_intake_queue_depth",
                                  "Messages waiting to be decoded.", registry=r)
        self.batch_depth = Gauge("edge_module_batch_queue_depth",
                                 "Decoded requests waiting for inference.", registry=r)
        self.ready = Gauge("edge_module_ready", "1 when the module serves.", registry=r)
        self.thread_restarts = Counter(
            "edge_module_thread_restarts",
            "Worker threads restarted by the supervisor after they died, by thread.",
            ["thread"], registry=r)
        self.connected = Gauge("edge_module_transport_connected",
                               "1 while the transport is connected.", registry=r)

        # Metering backlog (gauges refreshed from the ledger at every scrape).
        self.ledger_pending = Gauge("edge_module_ledger_pending_records",
                                    "Usage records waiting for upload.", registry=r)
        self.ledger_oldest_age = Gauge(
            "edge_module_ledger_oldest_pending_age_seconds",
            "Age of the oldest usage record waiting for upload (0 when none).", registry=r)
        self.ledger_quarantined = Gauge("edge_module_ledger_quarantined_records",
                                        "Usage records rejected for good, kept aside.",
                                        registry=r)
        self.ledger_fill = Gauge("edge_module_ledger_fill_ratio",
                                 "Pending records or ledger size over its cap (1 = full, "
                                 "new work refused; warning at 0.8).", registry=r)
        self.ledger_bytes = Gauge("edge_module_ledger_bytes", "Ledger size on disk.",
                                  registry=r)
        self.ledger_commit_seconds = Histogram("edge_module_ledger_commit_seconds",
                                               "Time of one group commit.",
                                               buckets=LATENCY_BUCKETS, registry=r)
        self.drain_acknowledged = Counter("edge_module_drain_acknowledged_records",
                                          "Usage records accepted by the billing endpoint.",
                                          registry=r)
        self.drain_duplicates = Counter("edge_module_drain_duplicate_records",
                                        "Usage records the endpoint already had (a resend; "
                                        "counted as delivered).", registry=r)
        self.drain_quarantined = Counter("edge_module_drain_quarantined_records",
                                         "Usage records rejected for good.", registry=r)
        self.drain_unverified = Counter(
            "edge_module_drain_unverified_answers",
            "Upload answers whose signed receipt did not verify (unsigned, foreign key, other "
            "installation): nothing they name is settled.", registry=r)
        self.drain_failures = Counter("edge_module_drain_failures",
                                      "Failed uploads, by status.", ["status"], registry=r)
        self.drain_seconds = Histogram("edge_module_drain_batch_seconds",
                                       "Time of one upload call.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.last_drain = Gauge("edge_module_drain_last_success_timestamp_seconds",
                                "When an upload last succeeded (epoch seconds).", registry=r)
        self.replays = Counter("edge_module_replayed_messages",
                               "Redelivered inputs answered again without a new usage record.",
                               registry=r)

        self.licence_state = Gauge("edge_module_licence_state",
                                   "1 for the current grace state (online, grace, gated).",
                                   ["state"], registry=r)
        self.licence_status = Gauge("edge_module_licence_api_status",
                                    "1 for the last status of the key (Valid, ...).",
                                    ["status"], registry=r)
        self.grace_remaining = Gauge("edge_module_licence_grace_remaining_seconds",
                                     "Offline grace left under the last signed lease.",
                                     registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
