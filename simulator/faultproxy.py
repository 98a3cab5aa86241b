"""A TCP fault proxy that tests put between the module and a server (billing, broker).

Modes, switched at run time:

* ``pass``: forward both ways;
* ``cut``: the listening socket is closed, so connecting is refused, and every
  open connection is closed (a cable pulled, a server down);
* ``blackhole``: connections are accepted and open ones stay open, but
  nothing is forwarded any more in either direction (a silent firewall, a
  frozen server): only timeouts can tell;
* ``restore`` returns to ``pass``; blackholed connections are closed so that
  clients reconnect.

In tests: ``FaultProxy(target_port).start()``; from a shell:
``python -m simulator.faultproxy --listen 9000 --target 127.0.0.1:8600`` with
``cut``/``blackhole``/``restore`` typed on standard input.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import sys
import threading

from simulator.broker import free_port


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1",
                 listen_port: int | None = None, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = listen_port or free_port(listen_host)
        self.mode = "pass"
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        # While cut, a bound socket that does not listen holds the port: connecting is
        # refused, yet no client can be handed the port as its own source port (a
        # loopback self-connect would otherwise occupy it and make restore fail).
        self._placeholder: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._stop = threading.Event()
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def _bound(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.listen_host, self.port))
        return sock

    def _listen(self) -> None:
        sock = self._bound()
        sock.listen(64)
        self._listener = sock
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        self._acceptor = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True,
                                          name="faultproxy-accept")
        self._acceptor.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                return  # the listener was closed (cut or stop)
            self.accepted += 1
            with self._lock:
                self._connections.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            if self.mode == "pass":
                upstream = socket.create_connection(self.target, timeout=5)
                with self._lock:
                    self._connections.add(upstream)
            pair: list[socket.socket] = [client] if upstream is None else [client, upstream]
            while not self._stop.is_set():
                ready, _, _ = select.select(pair, [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if self.mode != "pass" or upstream is None:
                        continue  # blackhole: swallow everything
                    (upstream if sock is client else client).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for end in (client, upstream):
                if end is not None:
                    with self._lock:
                        self._connections.discard(end)
                    with contextlib.suppress(OSError):
                        end.close()

    def _close_all(self) -> None:
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def cut(self) -> None:
        """Refuse new connections and drop open ones."""
        self.mode = "cut"
        if self._listener is not None:
            self._placeholder = self._bound()
            self._listener.close()
            self._listener = None
            if self._acceptor is not None:
                # select() keeps the closed socket listening until it returns.
                self._acceptor.join(timeout=2)
        self._close_all()

    def blackhole(self) -> None:
        """Accept, never forward; open connections go silent."""
        if self._listener is None:
            self._listen()
        self.mode = "blackhole"

    def restore(self) -> None:
        previous = self.mode
        self.mode = "pass"
        if previous == "blackhole":
            self._close_all()
        if self._listener is None:
            self._listen()

    def stop(self) -> None:
        self._stop.set()
        for sock in (self._listener, self._placeholder):
            if sock is not None:
                sock.close()
        self._close_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TCP fault proxy")
    parser.add_argument("--listen", type=int, required=True, help="port to listen on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    proxy = FaultProxy(int(port), host or "127.0.0.1", args.listen).start()
    print(f"proxy 127.0.0.1:{proxy.port} -> {args.target}; type cut, blackhole or restore",
          flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command in ("cut", "blackhole", "restore"):
            getattr(proxy, command)()
            print(f"mode: {proxy.mode}", flush=True)
        elif command:
            print("commands: cut, blackhole, restore", flush=True)
    proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
