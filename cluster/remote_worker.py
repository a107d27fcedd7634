"""The scheduler's side of a worker actor: every Ray call has a timeout, and every way a call
can fail because the worker is gone becomes WorkerLost, which the scheduler knows how to handle."""

from __future__ import annotations

import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from goodspec.scheduler.scheduler import WorkerLost
from goodspec.workers.kv_cache import UnknownSequenceError
from goodspec.workers.messages import ProposeBatch, Proposal, VerifyBatch, VerifyResult

try:  # newer Ray raises this while an actor is restarting
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError


class RemoteWorker:
    def __init__(self, handle, name: str, timeout_s: float) -> None:
        self.handle = handle
        self.name = name
        self.timeout_s = timeout_s

    def _call(self, method: str, *args):
        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=self.timeout_s)
        except GetTimeoutError as e:
            # A hung worker is as good as dead: restart it so the next call finds a live one.
            ray.kill(self.handle, no_restart=False)
            raise WorkerLost(f"{self.name}.{method} timed out after {self.timeout_s}s") from e
        except (RayActorError, ActorUnavailableError) as e:
            back = self._wait_until_back()
            state = "restarted" if back else f"not back after {self.timeout_s}s"
            raise WorkerLost(f"{self.name} actor died during {method} ({type(e).__name__}); {state}") from e
        except RayTaskError as e:
            if isinstance(e.cause, UnknownSequenceError):
                raise WorkerLost(f"{self.name} lost its KV cache (restarted): {e.cause}") from e
            raise e.cause from e

    def _wait_until_back(self) -> bool:
        """Ray restarts a dead actor by itself; wait (bounded) until it answers again, so one
        death costs one failed step rather than a burst of failures while it reloads."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.handle.info.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return True
            except GetTimeoutError:
                return False
            except (RayActorError, ActorUnavailableError):
                time.sleep(0.2)
        return False

    def propose(self, batch: ProposeBatch) -> Proposal:
        return self._call("propose", batch)

    def verify(self, batch: VerifyBatch) -> VerifyResult:
        return self._call("verify", batch)

    def free(self, req_ids: list[str]) -> None:
        # Fire and forget: actor calls run in order, so a later propose/verify sees it done.
        self.handle.free.remote(req_ids)

    def info(self):
        return self._call("info")

    def used_blocks(self) -> int:
        return self._call("used_blocks")
