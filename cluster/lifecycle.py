"""A serving process's edges in time: refuse a taken port before minutes of model loading, and
never let a dying Ray runtime hang the exit (used by `goodspec serve`)."""

from __future__ import annotations

import sys

SHUTDOWN_TIMEOUT_S = 15.0


def ensure_port_free(host: str, port: int) -> None:
    """Fail now, with the reason, when another process serves the port (gRPC's SO_REUSEPORT
    would otherwise let two servers share it)."""
    import socket

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"cannot bind {host}:{port}: {e.strerror} (another goodspec serve?)") from None


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
