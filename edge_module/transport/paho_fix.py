"""A fix for paho-mqtt 1.6: a TLS error while sending or receiving kills its network thread.

paho 1.6 turns only ``ConnectionError`` from the socket into "connection
lost". A TLS socket whose peer vanished (edgeHub or the broker killed) raises
``ssl.SSLEOFError`` or another ``ssl.SSLError`` instead; that escapes the
network loop, the loop thread dies, and the client keeps reporting itself as
connected forever: no reconnect, every publish waits for good. paho 2.0 fixed
it (eclipse-paho/paho.mqtt.python#750, #797) by treating every OSError as a
broken connection; azure-iot-device 2.14 requires paho < 2, so the same rule
is applied here to the 1.6 client (both our MQTT transport and the SDK's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

_APPLIED = False


def _broken(exc: OSError) -> ConnectionError:
    error = ConnectionResetError(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _as_connection_error(original: Callable[[mqtt.Client, Any], Any]
                         ) -> Callable[[mqtt.Client, Any], Any]:
    def call(self: mqtt.Client, arg: Any) -> Any:
        try:
            return original(self, arg)
        except (BlockingIOError, ConnectionError):
            raise
        except OSError as exc:
            raise _broken(exc) from exc

    return call


def apply() -> None:
    """Patch ``paho.mqtt.client.Client`` once per process."""
    global _APPLIED
    if _APPLIED:
        return
    mqtt.Client._sock_send = _as_connection_error(mqtt.Client._sock_send)
    mqtt.Client._sock_recv = _as_connection_error(mqtt.Client._sock_recv)
    _APPLIED = True
