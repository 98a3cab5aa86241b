"""The supervisor keeps worker threads alive: a dead worker is restarted, reported down
(``/ready``) meanwhile and counted; paho's network loops are supervised from inside, so
a loop that dies reconnects and serves again (real mosquitto)."""

from __future__ import annotations

import threading
from typing import Any

from edge_module.config import MqttSettings
from edge_module.metrics import Metrics
from edge_module.supervisor import Supervisor
from edge_module.transport.base import Inbound
from edge_module.transport.mqtt import MqttTransport
from tests.support import Broker, Collector, wait_until


def test_a_dead_worker_is_restarted_and_reported_down_meanwhile() -> None:
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    runs: list[int] = []
    stop = threading.Event()
    release = threading.Event()

    def worker() -> None:
        runs.append(1)
        if len(runs) == 1:
            release.wait(5)
            raise OSError(28, "No space left on device")
        stop.wait(10)

    supervisor.spawn("drain", worker)
    wait_until(lambda: len(runs) == 1, 5, "the worker started")
    assert supervisor.down() == {}
    release.set()
    wait_until(lambda: "drain" in supervisor.down(), 5, "the worker reported down")
    assert "No space left on device" in supervisor.down()["drain"]
    wait_until(lambda: len(runs) == 2, 5, "the worker restarted")
    assert supervisor.down() == {}
    assert b'edge_module_thread_restarts_total{thread="drain"} 1.0' in metrics.render()
    supervisor.stop()
    stop.set()
    supervisor.threads[0].join(5)
    assert not supervisor.threads[0].is_alive()  # after stop() a return is final


def test_a_dead_mqtt_network_loop_is_restarted_and_serves_again(broker: Broker) -> None:
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    settings = MqttSettings.model_validate({
        "Port": broker.port, "InputTopic": ["sv/in/#"], "ResultTopic": "sv/results",
        "ErrorTopic": "sv/errors", "AvailabilityTopic": "sv/status"})
    transport = MqttTransport(settings, "supervised", metrics)
    transport.keep = supervisor.keep_library_loop
    received: list[Inbound] = []

    def deliver(inbound: Inbound) -> None:
        received.append(inbound)
        transport.send_result(inbound, b'{"ok": true}')

    collector = Collector(broker.port, ["sv/results"])
    try:
        transport.start(deliver)
        wait_until(lambda: transport.connected, 10, "the transport connected")
        # An error inside paho's loop (outside the callbacks) ends the thread's loop.
        intake: Any = transport._intake
        original = intake._loop
        fired = threading.Event()

        def broken(*args: Any, **kwargs: Any) -> Any:
            if not fired.is_set():
                fired.set()
                raise RuntimeError("simulated bug in the network loop")
            return original(*args, **kwargs)

        intake._loop = broken
        wait_until(fired.is_set, 10, "the loop hit the error")
        wait_until(lambda: b'thread="mqtt-intake"} 1.0' in metrics.render(), 10,
                   "the intake loop restarted")
        assert supervisor.down() == {}
        collector.publish("sv/in/x", b"hello")
        wait_until(lambda: len(collector.on("sv/results")) == 1, 10,
                   "an answer through the restarted loop")
        assert [m.payload for m in received] == [b"hello"]
    finally:
        supervisor.stop()
        transport.stop_intake()
        transport.close(2)
        collector.close()


def test_the_http_server_loop_is_supervised_and_serves_again_on_the_same_port() -> None:
    """uvicorn's loop ending while the module runs is a dead thread like any other: it is
    reported down, restarted with a fresh server on the still-bound socket, and serves."""
    import urllib.request

    from edge_module.api.router import Response, Router
    from edge_module.api.server import HttpLimits, HttpServer

    metrics = Metrics()
    supervisor = Supervisor(metrics)
    router = Router()
    router.add("GET", "/ping", lambda _: Response.json(200, {"pong": True}), blocking=False)
    server = HttpServer(router, "127.0.0.1", 0, HttpLimits())
    server.start(spawn=supervisor.spawn)

    def ping() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ping",
                                        timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    try:
        assert ping()
        first = server.server
        first.should_exit = True  # the loop ends although nobody asked the module to stop
        wait_until(lambda: server.server is not first, 10, "a fresh server")
        wait_until(ping, 10, "the API answers again on the same port")
        assert b'edge_module_thread_restarts_total{thread="http"} 1.0' in metrics.render()
    finally:
        supervisor.stop()
        server.stop()
    assert not ping()
    assert all(not t.is_alive() for t in supervisor.threads)
