"""The scheduler's side of a worker actor: the per-step calls go over the worker's direct channel,
the rest through Ray; every call has a timeout, and every way a call can fail because the worker
is gone becomes WorkerLost, which the scheduler knows how to handle."""

from __future__ import annotations

import time

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from goodspec.cluster.channel import ChannelClient
from goodspec.scheduler.errors import WorkerGone, WorkerLost
from goodspec.workers.kv_cache import UnknownSequenceError
from goodspec.workers.messages import ProposeBatch, Proposal, VerifyBatch, VerifyResult

try:  # newer Ray raises this while an actor is restarting
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError

# Ray answers a call to an actor it is restarting with ActorUnavailableError (or holds it until
# the actor is back) and one to an actor it has given up on with ActorDiedError. Right after a
# death the two can briefly overlap, so only ActorDiedError for this long means "gone for good".
GONE_AFTER_S = 3.0


class RemoteWorker:
    reads_features = False  # set from the draft worker's WorkerInfo
    feature_layers: tuple[int, ...] = ()  # likewise

    def __init__(self, handle, name: str, timeout_s: float, channel_token: str) -> None:
        self.handle = handle
        self.name = name
        self.timeout_s = timeout_s
        self._token = channel_token
        self._channel: ChannelClient | None = None  # (re)connected lazily, after every failure

    def _ray_call(self, method: str, *args):
        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=self.timeout_s)
        except GetTimeoutError as e:
            self._restart()
            raise WorkerLost(f"{self.name}.{method} timed out after {self.timeout_s}s") from e
        except (RayActorError, ActorUnavailableError) as e:
            raise self._died(method, e) from e
        except RayTaskError as e:
            raise e.cause from e

    def _connect(self) -> ChannelClient:
        if self._channel is None:
            address = tuple(self._ray_call("info").channel)
            try:
                self._channel = ChannelClient(address, self._token, self.timeout_s)
            except OSError as e:
                raise self._died("connect", e) from e
        return self._channel

    def _call(self, method: str, arg):
        channel = self._connect()
        try:
            return channel.call(method, arg)
        except TimeoutError as e:
            self._channel = None
            self._restart()
            raise WorkerLost(f"{self.name}.{method} timed out after {self.timeout_s}s") from e
        except OSError as e:  # connection reset or closed: the process is gone
            self._channel = None
            raise self._died(method, e) from e
        except UnknownSequenceError as e:
            raise WorkerLost(f"{self.name} lost its KV cache (restarted): {e}") from e

    def _restart(self) -> None:
        # A hung worker is as good as dead: restart it so the next call finds a live one.
        ray.kill(self.handle, no_restart=False)

    def _died(self, method: str, e: BaseException) -> WorkerLost:
        state = self._wait_until_back()
        if state == "gone":
            return WorkerGone(f"{self.name} actor died during {method} ({type(e).__name__}) and Ray "
                              f"will not restart it (its restarts are used up)")
        detail = "restarted" if state == "back" else f"not back after {self.timeout_s}s"
        return WorkerLost(f"{self.name} actor died during {method} ({type(e).__name__}); {detail}")

    def _wait_until_back(self) -> str:
        """Ray restarts a dead actor by itself; wait (bounded) until it answers again, so one
        death costs one failed step rather than a burst of failures while it reloads.
        Returns "back", "gone" (Ray gave up on it) or "timeout"."""
        deadline = time.monotonic() + self.timeout_s
        dead_since = None
        while time.monotonic() < deadline:
            try:
                ray.get(self.handle.info.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return "back"
            except GetTimeoutError:
                return "timeout"
            except ActorDiedError:
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - dead_since >= GONE_AFTER_S:
                    return "gone"
            except (RayActorError, ActorUnavailableError):
                dead_since = None
            time.sleep(0.2)
        return "timeout"

    def propose(self, batch: ProposeBatch) -> Proposal:
        return self._call("propose", batch)

    def verify(self, batch: VerifyBatch) -> VerifyResult:
        return self._call("verify", batch)

    def free(self, req_ids: list[str]) -> None:
        # Fire and forget: the channel is ordered, so a later propose/verify sees it done. With no
        # live connection the worker is restarting and holds no caches to free.
        if self._channel is None:
            return
        try:
            self._channel.send("free", req_ids)
        except OSError:
            self._channel = None

    def info(self):
        return self._ray_call("info")

    def used_blocks(self) -> int:
        return self._ray_call("used_blocks")
