"""LLMEngine: tokenizer + scheduler + draft and target workers, in one process.

The same Scheduler drives Ray actors in goodspec.cluster; here the workers are plain objects,
which is what `goodspec generate` uses and what the tests drive directly.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from goodspec.config import EngineConfig
from goodspec.scheduler.config import KVBudget
from goodspec.scheduler.plan import RequestOutput
from goodspec.scheduler.policy import PolicySpec, SpeculationPolicy
from goodspec.scheduler.profiler import device_key
from goodspec.scheduler.scheduler import Scheduler
from goodspec.scheduler.service import Completion, usage_of
from goodspec.workers.huge_pages import huge_pages_on
from goodspec.workers.sampling import SamplingParams
from goodspec.workers.tokenizer import TextCodec


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        # Imported here, not at the top: the Ray scheduler actor imports this module for
        # build_scheduler and loads no model; the workers pull in transformers' modelling stack,
        # ~4.5 s of imports per engine start on a 2-core CPU.
        from goodspec.workers.draft_worker import DraftWorker
        from goodspec.workers.target_worker import TargetWorker

        self.config = config
        self.codec = TextCodec.load(config.target_dir, config.draft_dir)
        self.target = TargetWorker(config.target_runner_config(), config.draft_dir)
        self.draft = None  # proposer ngram: prompt lookup in the scheduler, no draft worker
        if config.draft_dir is not None:
            # one process: the draft runs on the target's torch threads (draft_threads is for Ray workers)
            self.draft = DraftWorker(config.draft_runner_config(threads=config.threads))
        draft_runner = getattr(self.draft, "runner", None)
        self.scheduler = build_scheduler(
            config, self.codec, self.target, _budget(self.target.runner), self.target.runner.max_context,
            self.draft, _budget(draft_runner) if draft_runner else None,
            draft_runner.max_context if draft_runner else None,
            device_key=device_key(_runner_key(self.target.runner),
                                  _runner_key(draft_runner) if draft_runner else None, "in-process",
                                  huge_pages_on()),
        )
        self._ids = itertools.count()
        self._prompts: dict[str, str] = {}

    def add_request(
        self, prompt: str, sampling: SamplingParams, req_id: str | None = None,
        policy: PolicySpec | SpeculationPolicy | str | None = None, max_k: int | None = None,
    ) -> str:
        """Queue a prompt; `policy` (a spec or its text, e.g. "fixed:3") overrides the engine's
        for this request."""
        req_id = req_id or f"req-{next(self._ids)}"
        if isinstance(policy, str):
            policy = PolicySpec.parse(policy)
        self.scheduler.add_request(req_id, self.codec.encode(prompt), sampling, policy, max_k)
        self._prompts[req_id] = prompt
        return req_id

    def step(self) -> list[RequestOutput]:
        return self.scheduler.step()

    def abort(self, req_id: str) -> bool:
        return self.scheduler.abort(req_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def take_completion(self, req_id: str) -> Completion:
        req = self.scheduler.pop_finished(req_id)
        return Completion(
            req_id=req.req_id, prompt=self._prompts.pop(req_id),
            text=self.codec.decode_output(req.output_ids, req.sampling.stop),
            token_ids=req.output_ids,
            finish_reason=req.finish_reason,
            usage=usage_of(req), error=req.error,
        )

    def generate(
        self, prompts: list[str], sampling: SamplingParams | list[SamplingParams],
        progress: bool = False, policy: PolicySpec | SpeculationPolicy | str | None = None,
    ) -> list[Completion]:
        """Run all prompts as one continuously batched workload; completions in prompt order.
        `policy` overrides the engine's for these requests (as in add_request)."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        ids = [self.add_request(p, s, policy=policy) for p, s in zip(prompts, params)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while self.has_unfinished():
            for out in self.step():
                if out.finished and bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [self.take_completion(i) for i in ids]


def build_scheduler(
    config: EngineConfig, codec: TextCodec, target, target_kv: KVBudget, target_context: int,
    draft=None, draft_kv: KVBudget | None = None, draft_context: int | None = None,
    device_key: list[object] = (),
) -> Scheduler:
    """The one way an engine's Scheduler is made, in process or in the Ray scheduler actor:
    context capped by both models, EOS and stop strings from the tokenizer, and goodput policies
    seeded from the (cached) profiling sweep before the first request (config.startup_profile)."""
    from goodspec.scheduler.profiler import warm_up_goodput

    sched_cfg = replace(
        config.scheduler,
        max_context=min(config.scheduler.max_context, target_context,
                        *([draft_context] if draft_context else [])),
        eos_token_id=codec.eos_token_id,
    )
    scheduler = Scheduler(sched_cfg, target=target, target_kv=target_kv, draft=draft, draft_kv=draft_kv,
                          policy=config.policy_spec.build(), stop_checker=codec.find_stop,
                          lookup=config.proposer in ("auto", "ngram"))
    if _profiles_at_start(config, scheduler):
        import torch

        warm_up_goodput(scheduler, target_kv.tokens,
                        [config.target_dir, config.draft_dir, config.proposer, config.threads, config.draft_threads,
                         torch.__version__, *device_key])
    return scheduler


def _profiles_at_start(config: EngineConfig, scheduler: Scheduler) -> bool:
    """Whether this engine runs (or loads) the start-up profiling sweep: see
    EngineConfig.startup_profile (an engine that cannot speculate skips it in warm_up_goodput)."""
    if config.startup_profile == "auto":
        return bool(scheduler.policies.learning())
    return config.startup_profile == "on"


def _runner_key(runner) -> tuple[str, str, int]:
    """A runner's part of the step-time profile's device key (profiler.device_key)."""
    return str(runner.device), runner.weights, runner.onednn_linears


def _budget(runner) -> KVBudget:
    spec = runner.cache.spec
    return KVBudget(spec.num_blocks, spec.block_size)
