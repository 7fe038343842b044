"""Serving the explore app: which Host headers it answers, and a uvicorn server that Ctrl-C stops promptly.

uvicorn waits for requests in flight when asked to stop, and a request computing in a worker thread cannot be
interrupted; so the first Ctrl-C (or SIGTERM) stops accepting, gives requests GRACE_S seconds, and a watchdog ends
the process shortly after if a computation still holds it; a second Ctrl-C ends it at once.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from cnnlab.explore.app import LOOPBACK_HOSTS

GRACE_S = 2.0  # seconds a request in flight gets to finish after Ctrl-C
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def allowed_hosts_for(host: str, port: int) -> tuple[str, ...]:
    """The Host headers a server on host:port answers: the loopback names and `host`, each with the port.

    A wildcard address (0.0.0.0, ::) answers any Host: it is meant to be reached by other computers' names for it.
    """
    if host in WILDCARD_HOSTS:
        return ("*",)
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = dict.fromkeys((*LOOPBACK_HOSTS, name.lower()))
    return tuple(f"{n}:{port}" for n in names)


def _hard_exit(code: int) -> None:
    """End the process now, whatever threads are still computing (explore writes no files of its own)."""
    try:
        sys.stdout.flush()
        sys.stderr.write("cnnlab: interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


class _Server(uvicorn.Server):
    """uvicorn whose shutdown never waits on a computation for more than GRACE_S + 1 seconds."""

    watchdog: threading.Timer | None = None
    stopped_by: int | None = None  # the exit code of the signal that stopped the server (130 for SIGINT)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: graceful stop plus a watchdog; a second one: exit at once."""
        code = 128 + int(sig)
        self.stopped_by = code
        if self.should_exit:
            _hard_exit(code)
        # Requests cut off by the shutdown are expected now: no tracebacks for them in the terminal.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        super().handle_exit(sig, frame)
        self.watchdog = threading.Timer(GRACE_S + 1.0, _hard_exit, args=(code,))
        self.watchdog.daemon = True
        self.watchdog.start()


def _computing() -> bool:
    """Whether a worker thread (a request's computation) is still running."""
    me = threading.current_thread()
    return any(t is not me and t.is_alive() and not t.daemon for t in threading.enumerate())


def no_delay(sock: socket.socket) -> socket.socket:
    """Turn Nagle's algorithm off on a listening socket (its connections inherit it): a response written in two parts
    would otherwise wait for the client's delayed ACK, 40 ms per request on Linux (44 ms -> 1.7 ms measured)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on an already bound socket until Ctrl-C / SIGTERM (KeyboardInterrupt for Ctrl-C)."""
    no_delay(sock)
    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACE_S))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        server.stopped_by = server.stopped_by or 130
    finally:
        if server.watchdog is not None:
            server.watchdog.cancel()
    # uvicorn raises the signal again under the handler it found at start, which usually ends run() with
    # KeyboardInterrupt. A parent that ignores SIGINT (a script's `cnnlab explore &`, some test runners) leaves it
    # ignored: the signal vanishes and run() returns. Either way, stop as the signal asked.
    if server.stopped_by is not None:
        if _computing():  # Python would wait for that thread (a queued computation) at exit: do not
            _hard_exit(server.stopped_by)
        raise KeyboardInterrupt
