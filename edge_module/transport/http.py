"""The HTTP and gRPC transports: OIP v2 requests as ``Inbound``s of the one pipeline, answers
as futures.

An HTTP handler (``api/v2.py``, on the server's event loop thread) builds an
:class:`HttpInbound` and offers it to the pipeline without blocking; the pipeline's
commit (or decode) thread calls ``send_result``/``send_error``, which complete the
inbound's asyncio future on its loop (``call_soon_threadsafe``). The handler awaits that
future with a deadline. A gRPC handler thread (``api/grpc_server.py``) waits on a
:class:`GrpcInbound`'s ``concurrent.futures.Future`` the same way. :class:`Transports`
puts these adapters beside the module's main transport (MQTT or edgeHub), so the
pipeline keeps one ``Transport`` and batches inputs from all of them together.

Threads: ``send_*`` run on pipeline threads; everything else on whoever calls it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass, field

from edge_module.transport.base import Deliver, Inbound, Transport


@dataclass
class Answer:
    """What the pipeline answered: the envelope (result or error) as bytes."""

    ok: bool
    body: bytes


@dataclass
class WaitedInbound(Inbound):
    """An input whose client waits with a deadline: it is billed only if the pipeline
    claims it before the client gives up (``abandon``), never after.

    ``claim`` (pipeline commit thread) and ``abandon`` (the waiting handler) race under a
    lock: whichever comes first wins, so an answer is either billed and delivered, or
    neither."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _state: str = field(default="waiting", repr=False, compare=False)

    def claim(self) -> bool:
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "claimed"
            return True

    def abandon(self) -> bool:
        """Give up waiting; False when the answer is already claimed (it is on its way)."""
        with self._lock:
            if self._state == "claimed":
                return False
            self._state = "abandoned"
            return True


@dataclass
class HttpInbound(WaitedInbound):
    """An input that arrived over HTTP; its answer completes ``reply`` on ``loop``."""

    loop: asyncio.AbstractEventLoop | None = None
    reply: asyncio.Future[Answer] | None = field(default=None, repr=False)


@dataclass
class GrpcInbound(WaitedInbound):
    """An input that arrived over gRPC; its answer completes ``reply`` (any thread)."""

    reply: concurrent.futures.Future[Answer] | None = field(default=None, repr=False)


def _complete(future: asyncio.Future[Answer], answer: Answer) -> None:
    if not future.done():  # the client may have gone (cancelled) or timed out
        future.set_result(answer)


def answer_http(inbound: HttpInbound, answer: Answer) -> None:
    """Complete the inbound's future from any thread, then settle it."""
    if inbound.loop is not None and inbound.reply is not None:
        # a closed loop: the server stopped and nobody waits for this answer
        with contextlib.suppress(RuntimeError):
            inbound.loop.call_soon_threadsafe(_complete, inbound.reply, answer)
    inbound.settle()


class Transports:
    """The module's main transport plus the HTTP adapter, seen by the pipeline as one.

    Answers to :class:`HttpInbound`\\ s and :class:`GrpcInbound`\\ s go back to their
    handler; every other
    call goes to the main transport (whose intake, connection and shutdown it owns).
    """

    def __init__(self, main: Transport) -> None:
        self.main = main

    def start(self, deliver: Deliver) -> None:
        self.main.start(deliver)

    def send_result(self, inbound: Inbound, body: bytes) -> None:
        self._send(inbound, body, True)

    def send_error(self, inbound: Inbound, body: bytes) -> None:
        self._send(inbound, body, False)

    def _send(self, inbound: Inbound, body: bytes, ok: bool) -> None:
        if isinstance(inbound, HttpInbound):
            answer_http(inbound, Answer(ok, body))
        elif isinstance(inbound, GrpcInbound):
            if inbound.reply is not None and not inbound.reply.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    inbound.reply.set_result(Answer(ok, body))
            inbound.settle()
        elif ok:
            self.main.send_result(inbound, body)
        else:
            self.main.send_error(inbound, body)

    def stop_intake(self) -> None:
        self.main.stop_intake()

    def close(self, timeout: float) -> None:
        self.main.close(timeout)

    @property
    def connected(self) -> bool:
        return self.main.connected
