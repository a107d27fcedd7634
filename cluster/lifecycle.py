"""A serving process's edges in time: refuse a taken port before minutes of model loading (and
hold it until the server binds), and never let a dying Ray runtime hang the exit (used by
`goodspec serve`)."""

from __future__ import annotations

import socket
import sys

SHUTDOWN_TIMEOUT_S = 15.0


def hold_port(host: str, port: int) -> socket.socket | None:
    """Bind the serving port now and keep it until the gRPC server has bound it (then close the
    returned socket; None for port 0).

    Fails at once, with the reason, when another process serves the port: before minutes of
    model loading, and rather than sharing it (gRPC's SO_REUSEPORT is off, server_options).
    Held rather than only checked because Ray's processes start in between (~10 s here) and
    take ports from the same ephemeral range (32768-60999 on Linux; 50051 is inside it): a
    checked-then-closed port was once handed to one of them and the server then failed to bind
    (a CI run, thirty-first session). The kernel never hands a bound port to a bind(0) or an
    outgoing connect. gRPC can still bind it meanwhile: both sockets set SO_REUSEADDR and this
    one never listens; a listening server on the port refuses this bind."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is fine
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise RuntimeError(f"cannot bind {host}:{port}: {e.strerror} (another goodspec serve?)") from None
    return s


def shutdown_within(group, timeout_s: float) -> None:
    """Stop the engines, but never hang the exit on a Ray runtime that is itself going away."""
    import os
    import threading

    done = threading.Thread(target=group.shutdown, name="goodspec-shutdown", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        print(f"goodspec: the Ray runtime did not answer within {timeout_s:.0f}s at shutdown; exiting",
              file=sys.stderr, flush=True)
        os._exit(0)  # drained already; Ray's own exit hooks would wait on the same dead runtime
