"""The scheduler's errors: what a request or a worker call can fail with."""

from __future__ import annotations


class RequestRejected(ValueError):
    """The request can never be served with this configuration (bad input or too large)."""


class WorkerLost(RuntimeError):
    """A worker call failed because the worker died, hung past its timeout, or came back
    without the caches it had (restarted). Raised by the transport in goodspec.cluster."""


class WorkerGone(WorkerLost):
    """The worker died and will not come back (its restarts are used up): no point retrying."""


class EngineUnhealthy(RuntimeError):
    """A worker kept failing and could not be brought back; the engine serves nothing more."""
