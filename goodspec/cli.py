"""The `goodspec` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from goodspec.config import DEFAULT_DRAFT, DEFAULT_TARGET

    p.add_argument("--target", default=DEFAULT_TARGET, help="target model directory (HF format)")
    p.add_argument("--draft", default=DEFAULT_DRAFT,
                   help="draft model directory (HF format, same tokenizer); 'none' for no draft")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0 = default)")
    p.add_argument("--kv-cache-tokens", type=int, default=32768, help="KV budget per model, in tokens")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests batched at once")
    p.add_argument("--max-k", type=int, default=8, help="largest speculation length")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="per-request seed (reproducible sampling)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="goodspec", description="Goodput-driven speculative decoding.")
    sub = ap.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions in-process, continuously batched")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--policy", default="fixed:3", help="speculation policy: off | fixed:K")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, in order")
    _add_model_args(gen)
    _add_sampling_args(gen)

    prof = sub.add_parser("profile", help="measure the target's verify cost against plain decoding")
    prof.add_argument("--target", default=None, help="model directory (default: the shipped target)")
    prof.add_argument("--device", default="auto")
    prof.add_argument("--dtype", default="auto")
    prof.add_argument("--batch-size", type=int, default=16)
    prof.add_argument("--k", type=int, default=4, help="draft tokens verified per sequence")
    prof.add_argument("--context", type=int, default=200)
    prof.add_argument("--repeats", type=int, default=15)
    return ap


def _engine_config(args):
    from goodspec.config import EngineConfig
    from goodspec.scheduler.scheduler import SchedulerConfig

    max_seqs = args.max_num_seqs
    return EngineConfig(
        target_dir=args.target,
        draft_dir=None if args.draft.lower() == "none" else args.draft,
        policy=args.policy,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        target_kv_tokens=args.kv_cache_tokens,
        draft_kv_tokens=args.kv_cache_tokens,
        scheduler=SchedulerConfig(
            max_num_seqs=max_seqs, max_k=args.max_k,
            max_num_batched_tokens=max(512, max_seqs * (args.max_k + 1)),
        ),
    )


def _sampling(args):
    from goodspec.workers.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )


def cmd_generate(args) -> int:
    from dataclasses import asdict

    from goodspec.engine import LLMEngine

    sampling = _sampling(args)
    engine = LLMEngine(_engine_config(args))
    t0 = time.perf_counter()
    completions = engine.generate(args.prompts, sampling, progress=sys.stderr.isatty())
    elapsed = time.perf_counter() - t0
    for c in completions:
        if args.json:
            print(json.dumps(asdict(c)), flush=True)
        else:
            print(f"=== {c.prompt!r} [{c.finish_reason}]\n{c.text}\n", flush=True)
    n_out = sum(len(c.token_ids) for c in completions)
    proposed = sum(c.draft_tokens_proposed for c in completions)
    accepted = sum(c.draft_tokens_accepted for c in completions)
    rate = f"{accepted / proposed:.2f}" if proposed else "n/a"
    print(f"{len(completions)} requests, {n_out} tokens in {elapsed:.2f}s "
          f"({n_out / elapsed:.1f} tok/s); draft acceptance {rate} ({accepted}/{proposed})",
          file=sys.stderr)
    return 0


def cmd_profile(args) -> int:
    from goodspec.config import DEFAULT_TARGET
    from goodspec.workers.model_runner import ModelRunner, RunnerConfig
    from goodspec.workers.profiling import time_forward

    runner = ModelRunner(RunnerConfig(args.target or DEFAULT_TARGET, args.device, args.dtype,
                                      kv_cache_tokens=args.batch_size * (args.context + 64)))
    b, ctx = args.batch_size, args.context
    decode = time_forward(runner, b, 1, ctx, args.repeats)
    verify = time_forward(runner, b, args.k + 1, ctx, args.repeats)
    print(f"device {runner.device}, dtype {runner.dtype}, batch {b}, context {ctx}, "
          f"median of {args.repeats}")
    print(f"decode  1 token/seq : {decode.median_s * 1e3:8.2f} ms")
    print(f"verify {args.k + 1} tokens/seq: {verify.median_s * 1e3:8.2f} ms")
    print(f"verify / decode     : {verify.median_s / decode.median_s:8.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "profile":
            return cmd_profile(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"goodspec: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
