"""EngineGroup: starts N engines on Ray (each: scheduler actor + draft actor + target actor in
one placement group) and routes every new request to the least-loaded engine.

This module and the others in goodspec.cluster are the only ones that import ray.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from goodspec.cluster.channel import new_token
from goodspec.cluster.cores import usable_cores
from goodspec.cluster.engine_actor import EngineActor
from goodspec.cluster.output_stream import LOST, OutputRouter
from goodspec.cluster.ray_runtime import LOOPBACK_HOSTS, init_ray
from goodspec.cluster.worker_actor import WorkerActor
from goodspec.config import GoodspecConfig
from goodspec.scheduler.errors import EngineUnhealthy
from goodspec.scheduler.policy import PolicySpec
from goodspec.scheduler.stats import EngineStats
from goodspec.scheduler.service import Completion, StreamChunk, Usage
from goodspec.workers.huge_pages import worker_env
from goodspec.workers.sampling import SamplingParams
from goodspec.workers.tokenizer import TextCodec

log = logging.getLogger("goodspec.cluster")


class PlacementError(RuntimeError):
    """The Ray cluster cannot host an engine's actors."""


@dataclass
class _Engine:
    index: int
    actor: object
    target: object
    draft: object | None
    pg: object
    outstanding: int = 0  # router's own count of tokens it sent and not yet seen finish
    unhealthy: str | None = None  # why the router stopped sending it requests (None: it is fine)
    broken: bool = False  # it will never serve again (not merely slow to answer): replace it
    # its output stream on each event loop that reads it (goodspec.cluster.output_stream)
    routers: dict = field(default_factory=dict)


def channel_host_for(placement_strategy: str) -> str | None:
    """Where a worker's channel listens: loopback when the engine's actors share a node (so no
    other host can reach it), else the node's address (None)."""
    return "127.0.0.1" if placement_strategy == "STRICT_PACK" else None


class EngineGroup:
    def __init__(self, config: GoodspecConfig) -> None:
        self.config = config
        self.codec = TextCodec.load(config.engine.target_dir, config.engine.draft_dir)
        self._owns_ray = init_ray(config.cluster, loopback=config.server.host in LOOPBACK_HOSTS)
        self.engines: list[_Engine] = []
        self._ids = itertools.count()
        try:
            for i in range(config.cluster.replicas):
                self.engines.append(self._start_engine(i))
            self._ready = [ray.get(e.actor.ready.remote(), timeout=config.cluster.placement_timeout_s + 300)
                           for e in self.engines]
        except Exception:
            self.shutdown()
            raise

    # -- start-up ------------------------------------------------------------------------------
    def _worker_gpus(self) -> float:
        c = self.config.cluster
        if c.worker_gpus is not None:
            return c.worker_gpus
        if self.config.engine.device == "cpu":
            return 0.0
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def _start_engine(self, index: int) -> _Engine:
        cfg, cl = self.config.engine, self.config.cluster
        gpus = self._worker_gpus()
        worker_bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {})}
        bundles = [{"CPU": 1}, worker_bundle] + ([dict(worker_bundle)] if cfg.draft_dir else [])
        pg = placement_group(bundles, strategy=cl.placement_strategy, name=f"goodspec-engine-{index}-{uuid.uuid4().hex[:6]}")
        try:
            ray.get(pg.ready(), timeout=cl.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(pg)
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            raise PlacementError(
                f"engine {index} needs bundles {bundles} ({cl.placement_strategy}) but the Ray "
                f"cluster could not place them within {cl.placement_timeout_s}s; free now: {free}. "
                f"Lower replicas or worker_gpus, or add nodes."
            ) from None

        def opts(bundle: int, num_gpus: float = 0.0, **kw):
            return dict(
                num_cpus=1, num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=bundle),
                **kw,
            )

        # The draft proposes, then the target verifies: they take turns, so the target may use
        # every core the engine has; the draft keeps one thread (its 3 batch-1 passes in float32
        # took 15.5 ms with one thread, 19.5 ms with two). Measured on 2 cores: BENCHMARKS.md,
        # fifteenth session. On a joined cluster the nodes' cores are unknown here.
        cores = usable_cores() // max(1, cl.replicas) if cl.ray_address is None else 1
        cfg = replace(cfg, threads=cfg.threads or (1 if gpus else max(1, cores)),
                      draft_threads=cfg.draft_threads or 1)  # resolved here: the profile key sees them
        device = cfg.device if gpus or cfg.device != "auto" else "cpu"
        token = new_token()  # the workers' channels accept only this engine's scheduler
        channel_host = channel_host_for(cl.placement_strategy)
        worker_cls = ray.remote(WorkerActor)
        worker_opts = dict(max_restarts=cl.max_restarts, max_task_retries=0, runtime_env={"env_vars": worker_env()})
        target = worker_cls.options(**opts(1, gpus, **worker_opts)).remote(
            "target", cfg.target_runner_config(device), token, channel_host, cfg.draft_dir)
        draft = None
        if cfg.draft_dir:
            draft = worker_cls.options(**opts(2, gpus, **worker_opts)).remote(
                "draft", cfg.draft_runner_config(device), token, channel_host)
        actor = ray.remote(EngineActor).options(**opts(0), max_concurrency=10_000).remote(
            cfg, target, draft, cl.call_timeout_s, cl.placement_timeout_s + 300, token, index)
        return _Engine(index, actor, target, draft, pg)

    # -- requests ------------------------------------------------------------------------------
    def _pick(self) -> _Engine:
        live = [e for e in self.engines if e.unhealthy is None]
        if not live:
            raise EngineUnhealthy("no healthy engine: " + "; ".join(
                f"engine {e.index}: {e.unhealthy}" for e in self.engines))
        return min(live, key=lambda e: (e.outstanding, e.index))

    def worker_info(self, index: int = 0) -> dict:
        """Engine `index`'s workers as they reported at start: "target" and "draft" (None with
        no draft worker) -> WorkerInfo (pid, device, weights, threads, huge pages, ...)."""
        return {kind: self._ready[index].get(kind) for kind in ("target", "draft")}

    def model_info(self) -> dict:
        r = self.worker_info(0)
        cfg = self.config.engine
        return {
            "target": cfg.target_dir, "draft": cfg.draft_dir,
            "max_context": min(cfg.scheduler.max_context, r["target"].max_context),
            "vocab_size": self.codec.vocab_size, "policy": cfg.policy_spec.name, "proposer": cfg.proposer,
            "replicas": len(self.engines),
            "threads": {kind: r[kind].threads for kind in ("target", "draft") if r.get(kind) is not None},
            "dtypes": {kind: r[kind].weights for kind in ("target", "draft") if r.get(kind) is not None},
            "huge_pages": {kind: r[kind].huge_pages for kind in ("target", "draft") if r.get(kind) is not None},
        }

    async def complete_on(self, index: int, prompt: str, sampling: SamplingParams) -> None:
        """Run one request on a given engine (warm-up)."""
        async for _ in self.generate(self.codec.encode(prompt), sampling, engine=self.engines[index]):
            pass

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, req_id: str | None = None,
        policy: PolicySpec | None = None, max_k: int | None = None, engine: _Engine | None = None,
    ) -> AsyncIterator[tuple[int, StreamChunk]]:
        """Stream (replica, chunk) for one request, its prompt tokenised by the caller (once, at
        the edge). Request errors (RequestRejected, EngineUnhealthy, ValueError) raise before
        the first chunk, unwrapped from Ray."""
        req_id = req_id or f"req-{uuid.uuid4().hex[:12]}"
        engine = engine or self._pick()
        cost = len(prompt_ids) + sampling.max_new_tokens
        engine.outstanding += cost
        router = self._router(engine)
        queue: asyncio.Queue = asyncio.Queue()
        router.queues[req_id] = queue  # before submitting: no chunk can come before it
        submit, finished = None, False
        try:
            await router.opened()
            submit = engine.actor.submit.remote(req_id, prompt_ids, sampling, policy, max_k, router.subscriber)
            await submit
            while not finished:
                chunk = await queue.get()
                if chunk is LOST:
                    raise router.error or EngineUnhealthy(f"engine {engine.index}: its output stream ended")
                finished = chunk.finished
                yield engine.index, chunk
        except RayTaskError as e:
            if isinstance(e.cause, EngineUnhealthy):
                engine.unhealthy, engine.broken = str(e.cause), True
            raise e.cause from None
        except RayActorError as e:
            engine.unhealthy, engine.broken = f"its scheduler actor died ({type(e).__name__})", True
            raise EngineUnhealthy(f"engine {engine.index}: {engine.unhealthy}") from e
        finally:
            router.queues.pop(req_id, None)
            engine.outstanding -= cost
            if submit is not None and not finished and router.live:
                # The consumer went away (or was cancelled while submitting): free the request's
                # cache once it is in. (With the stream gone, the actor aborts it itself.)
                submit.future().add_done_callback(
                    lambda f: f.exception() is None and engine.actor.abort.remote(req_id))

    @staticmethod
    def _router(engine: _Engine) -> OutputRouter:
        """The engine's output stream on the running event loop (opened on first use; a loop
        that closes takes its stream with it)."""
        loop = asyncio.get_running_loop()
        router = engine.routers.get(loop)
        if router is None or not router.live:
            router = engine.routers[loop] = OutputRouter(
                engine.actor, lambda r: engine.routers.get(loop) is r and engine.routers.pop(loop))
        return router

    async def complete(self, prompt: str, sampling: SamplingParams, **kw) -> Completion:
        text, ids, last, replica = [], [], None, 0
        async for replica, chunk in self.generate(self.codec.encode(prompt), sampling, **kw):
            text.append(chunk.text)
            ids += chunk.token_ids
            last = chunk
        return Completion(last.req_id, prompt, "".join(text), ids, last.finish_reason,
                          last.usage or Usage(), replica, last.error)

    def complete_all(self, prompts: list[str], sampling: SamplingParams | list[SamplingParams],
                     policy: PolicySpec | None = None, progress: bool = False) -> list[Completion]:
        """All prompts concurrently (continuously batched by the engines), results in order."""
        from tqdm.asyncio import tqdm

        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)

        async def run():  # tqdm's gather keeps the order of its arguments
            return await tqdm.gather(*(self.complete(p, s, policy=policy) for p, s in zip(prompts, params)),
                                     desc="generate", unit="req", disable=not progress)

        return asyncio.run(run())

    # -- operations ----------------------------------------------------------------------------
    def stats(self) -> list[EngineStats]:
        """One row per engine; an engine whose scheduler actor does not answer gets a row that
        says so (zero counters) rather than failing the whole call."""
        refs = [e.actor.stats.remote() for e in self.engines]
        rows = []
        for e, ref in zip(self.engines, refs):
            try:
                rows.append(ray.get(ref, timeout=60))
            except (RayActorError, GetTimeoutError) as exc:
                rows.append(EngineStats.silent(e.index, f"scheduler actor does not answer ({type(exc).__name__})"))
        return rows

    def step_records(self, index: int, last: int = 0) -> list[dict]:
        """Engine `index`'s step records (the newest `last`; 0: all it keeps)."""
        return ray.get(self.engines[index].actor.step_records.remote(last), timeout=60)

    async def check_health(self) -> bool:
        """Ask every engine how it is, record the answer for the router, and say whether any
        engine can still serve. An engine that does not answer within a worker call's timeout
        (a step never takes longer) counts as unhealthy until it answers again."""
        timeout = self.config.cluster.call_timeout_s

        async def one(e: _Engine) -> None:
            try:
                s = await asyncio.wait_for(asyncio.wrap_future(e.actor.stats.remote().future()), timeout)
                e.unhealthy = s.unhealthy or None
                e.broken = e.unhealthy is not None  # an engine that gave up does not come back
            except RayActorError as exc:
                e.unhealthy, e.broken = f"its scheduler actor died ({type(exc).__name__})", True
            except Exception as exc:  # noqa: BLE001 - whatever the reason, it cannot serve now
                e.unhealthy = f"scheduler actor does not answer ({type(exc).__name__})"

        await asyncio.gather(*(one(e) for e in self.engines))
        return any(e.unhealthy is None for e in self.engines)

    def worker_blocks_used(self) -> list[dict]:
        """What the workers themselves report holding (not the scheduler's mirror)."""
        out = []
        for e in self.engines:
            row = {"target": ray.get(e.target.used_blocks.remote(), timeout=60)}
            if e.draft is not None:
                row["draft"] = ray.get(e.draft.used_blocks.remote(), timeout=60)
            out.append(row)
        return out

    async def replace_engine(self, index: int) -> None:
        """Put a fresh engine (new actors, new placement group) in place of engine `index`,
        which can no longer serve. Its requests have already failed; the router sends new ones
        elsewhere until the new engine is ready."""
        old = self.engines[index]
        _stop_engine(old)
        starting = asyncio.ensure_future(asyncio.to_thread(self._start_engine, index))  # blocks until placed
        try:
            new = await asyncio.shield(starting)
        except asyncio.CancelledError:  # shutting down: stop the engine once it exists
            starting.add_done_callback(lambda f: f.cancelled() or f.exception() or _stop_engine(f.result()))
            raise
        try:
            timeout = self.config.cluster.placement_timeout_s + 300
            ready = await asyncio.wait_for(asyncio.wrap_future(new.actor.ready.remote().future()), timeout)
        except BaseException:
            _stop_engine(new)
            raise
        self._ready[index] = ready
        self.engines[index] = new

    def shutdown(self) -> None:
        for e in self.engines:
            _stop_engine(e)
        self.engines = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False


def _stop_engine(e: _Engine) -> None:
    for handle in (e.actor, e.draft, e.target):
        if handle is not None:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
    try:
        remove_placement_group(e.pg)
    except Exception:  # noqa: BLE001 - already removed
        pass
