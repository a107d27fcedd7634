"""The `goodspec` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from goodspec.workers.huge_pages import ask_for_huge_pages

# before torch is imported (the imports below do), so in-process runners get them as workers do
ask_for_huge_pages()

from goodspec.config import add_config_flags, build_config, startup_profile_for
from goodspec.workers.cpu_linear import add_cpu_linear_flag


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="per-request seed (reproducible sampling)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=None, help="bearer token (default: env GOODSPEC_AUTH_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="PEM CA to verify the server (enables TLS)")
    p.add_argument("--tls-cert", default=None, help="client certificate for mTLS")
    p.add_argument("--tls-key", default=None, help="client key for mTLS")


def _client(args):
    import os

    from goodspec.client import GenerationClient

    return GenerationClient(args.address, token=args.token or os.environ.get("GOODSPEC_AUTH_TOKEN"),
                            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="goodspec", description="Goodput-driven speculative decoding.")
    sub = ap.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions in-process, continuously batched")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, in order")
    gen.add_argument("--stats", action="store_true",
                     help="print the engines' counters (steps, k histogram, acceptance, "
                          "predicted vs measured step time) as JSON on stderr")
    gen.add_argument("--in-process", action="store_true",
                     help="run scheduler and workers in this process instead of on Ray")
    gen.add_argument("--chat", action="store_true",
                     help="send each PROMPT as one user message, through the model's chat template")
    _add_sampling_args(gen)
    add_config_flags(gen)

    srv = sub.add_parser("serve", help="start the gRPC server in front of the Ray runtime",
                         description="Serve goodspec.v1.Generation over gRPC. Every config field "
                                     "is a flag; --config loads a YAML tree (engine/cluster/server).")
    add_config_flags(srv)

    comp = sub.add_parser("complete", help="send one prompt to a running server")
    comp.add_argument("prompt", metavar="PROMPT")
    comp.add_argument("--address", default="localhost:50051")
    comp.add_argument("--stream", action="store_true", help="print tokens as they are accepted")
    comp.add_argument("--json", action="store_true", help="print the response message as JSON")
    comp.add_argument("--policy", default="", help="per-request speculation policy override")
    comp.add_argument("--chat", action="store_true", help="send PROMPT as one user message (chat template)")
    comp.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    _add_client_args(comp)
    _add_sampling_args(comp)

    hc = sub.add_parser("health", help="exit 0 when the server at --address is SERVING")
    hc.add_argument("--address", default="localhost:50051")
    _add_client_args(hc)

    bench = sub.add_parser("bench", help="latency vs request rate on ShareGPT, policies compared on one trace")
    bench.add_argument("--address", default=None, help="a running server; unset = start the embedded one")
    bench.add_argument("--rates", default="0.5,1,2,4", help="comma-separated request rates (req/s)")
    bench.add_argument("--policies", default="off,fixed:1,fixed:3,fixed:5,goodput")
    bench.add_argument("--num-requests", type=int, default=32, help="requests per rate and policy")
    bench.add_argument("--workload", default="chat",
                       help="chat | copy (answers copy from the prompt) | sampled (temperature 0.7-1.0) | "
                            "mixed (the three in one trace) | FILE.jsonl (one request per line: prompt or "
                            "messages, max_new_tokens, optional temperature and kind)")
    bench.add_argument("--max-output-tokens", type=int, default=128, help="cap on each reply length")
    bench.add_argument("--warmup", type=int, default=4, help="warm-up requests per policy (not measured)")
    bench.add_argument("--repeats", type=int, default=1,
                       help="replays of each rate's trace per policy, policy order rotated (pooled)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", default="bench-results", help="folder for results.json/.md and latency.png")
    bench.add_argument("--peers", action="store_true",
                       help="also measure HF assisted generation and transformers continuous batching")
    bench.add_argument("--peer-requests", type=int, default=16)
    bench.add_argument("--peer-max-new-tokens", type=int, default=64)
    bench.add_argument("--token", default=None, help="bearer token of the server")
    bench.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                       help="render prompts with the chat template (auto: when the target has one)")
    add_config_flags(bench)

    prof = sub.add_parser("profile", help="measure the target's verify cost against plain decoding")
    prof.add_argument("--model", default="smollm2", help="named pair whose target to profile (smollm2 | tiny)")
    prof.add_argument("--target", default=None, help="model directory or GGUF file (overrides --model)")
    prof.add_argument("--device", default="auto")
    prof.add_argument("--dtype", default="auto")
    add_cpu_linear_flag(prof)
    prof.add_argument("--batch-size", type=int, default=16)
    prof.add_argument("--k", type=int, default=4, help="draft tokens verified per sequence")
    prof.add_argument("--context", type=int, default=200)
    prof.add_argument("--repeats", type=int, default=15)

    ovh = sub.add_parser("overhead", help="share of step time spent outside the models, on the Ray runtime")
    ovh.add_argument("--batch-size", type=int, default=8)
    ovh.add_argument("--policies", default="fixed:3,off")
    ovh.add_argument("--max-new-tokens", type=int, default=96)
    ovh.add_argument("--repeats", type=int, default=2, help="runs per policy, policies alternating")
    ovh.add_argument("--temperature", type=float, default=0.0, help="> 0: sampled requests (seeded)")
    add_config_flags(ovh)
    return ap


def _sampling(args):
    from goodspec.workers.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )


def cmd_generate(args) -> int:
    from goodspec.scheduler.stats import EngineStats

    config = build_config(args)
    sampling = _sampling(args)
    progress = sys.stderr.isatty()
    if args.in_process:
        from goodspec.engine import LLMEngine

        engine = LLMEngine(config.engine)
        t0 = time.perf_counter()
        prompts = _prompts(args, engine.codec)
        rows = [c.to_json() for c in engine.generate(prompts, sampling, progress=progress)]
        stats = [EngineStats.of(engine.scheduler)]
    else:
        from goodspec.cluster.group import EngineGroup

        group = EngineGroup(config)
        try:
            t0 = time.perf_counter()
            prompts = _prompts(args, group.codec)
            rows = [c.to_json() for c in group.complete_all(prompts, sampling, progress=progress)]
            stats = group.stats()
        finally:
            group.shutdown()
    for row, prompt in zip(rows, args.prompts):
        row["prompt"] = prompt  # what the user typed, not the rendered chat template
    elapsed = time.perf_counter() - t0
    if args.stats:
        print(json.dumps([s.to_json() for s in stats], indent=1), file=sys.stderr)
    for r in rows:
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"=== {r['prompt']!r} [{r['finish_reason']}]\n{r['text']}\n", flush=True)
    n_out = sum(len(r["token_ids"]) for r in rows)
    proposed = sum(r["draft_tokens_proposed"] for r in rows)
    accepted = sum(r["draft_tokens_accepted"] for r in rows)
    rate = f"{accepted / proposed:.2f}" if proposed else "n/a"
    print(f"{len(rows)} requests, {n_out} tokens in {elapsed:.2f}s "
          f"({n_out / elapsed:.1f} tok/s); draft acceptance {rate} ({accepted}/{proposed})",
          file=sys.stderr)
    return 0


def _prompts(args, codec) -> list[str]:
    return [codec.render_chat([("user", p)]) for p in args.prompts] if args.chat else list(args.prompts)


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from goodspec.cluster.group import EngineGroup
    from goodspec.cluster.grpc_server import serve_forever
    from goodspec.cluster.lifecycle import SHUTDOWN_TIMEOUT_S, hold_port, shutdown_within

    logging.basicConfig(level=logging.WARNING)
    config = build_config(args)
    held = hold_port(config.server.host, config.server.port)  # before minutes of model loading
    try:
        group = EngineGroup(config)
        try:
            asyncio.run(serve_forever(group, config.server, held))
        finally:
            shutdown_within(group, SHUTDOWN_TIMEOUT_S)
    finally:
        if held is not None:
            held.close()
    return 0


def cmd_complete(args) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature or None,
              top_p=args.top_p if args.top_p != 1.0 else None, top_k=args.top_k or None,
              seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos, policy=args.policy)
    prompt = args.prompt
    if args.chat:
        kw["messages"], prompt = [("user", args.prompt)], ""
    try:
        with _client(args) as client:
            if args.stream:
                for msg in client.generate(prompt, timeout=args.timeout, **kw):
                    if args.json:
                        print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True)), flush=True)
                    else:
                        print(msg.text, end="", flush=True)
                if not args.json:
                    print()
            else:
                msg = client.complete(prompt, timeout=args.timeout, **kw)
                print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True)) if args.json else msg.text)
    except grpc.RpcError as e:
        print(f"goodspec: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def cmd_health(args) -> int:
    import grpc

    try:
        with _client(args) as client:
            status = client.health()
    except grpc.RpcError as e:
        print(f"goodspec: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_bench(args) -> int:
    import os
    import platform
    from pathlib import Path

    from goodspec import bench, bench_peers
    from goodspec.cluster.cores import usable_cores
    from goodspec.gguf_import import source_name
    from goodspec.workers.tokenizer import TextCodec

    config = build_config(args)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    from goodspec.scheduler.policy import PolicySpec

    specs = [PolicySpec.parse(p) for p in args.policies.split(",") if p.strip()]
    policies = [s.name for s in specs]
    group = server = None
    address = args.address
    if address is None:
        from dataclasses import replace

        config = replace(config, engine=replace(
            config.engine, startup_profile=startup_profile_for(specs, config.engine.startup_profile)))
        from goodspec.cluster.group import EngineGroup
        from goodspec.cluster.grpc_server import BackgroundServer

        group = EngineGroup(config)
        server = BackgroundServer(group, replace(config.server, port=0,
                                                 max_queued_requests=max(config.server.max_queued_requests, 4 * args.num_requests)))
        address = server.address
    try:
        codec = TextCodec.load(config.engine.target_dir)
        chat = args.chat == "on" or (args.chat == "auto" and codec.has_chat_template)
        records, summaries = bench.run_benchmark(address, rates, policies, args.num_requests, args.seed,
                                                 args.warmup, codec, args.max_output_tokens,
                                                 progress=True, token=args.token, repeats=args.repeats,
                                                 chat=chat, workload_name=args.workload)
        peers = None
        if args.peers:
            from goodspec.workloads import build_workload

            prompts = [it.prompt for it in build_workload("chat", codec, args.peer_requests, args.seed + 1, chat=chat)]
            n = args.peer_max_new_tokens
            print("peers: goodspec offline, HF assisted generation, transformers generate_batch ...", file=sys.stderr)
            peers = {"goodspec": bench_peers.goodspec_offline(address, prompts, n, token=args.token)}
            assisted = config.engine.draft_dir and bench_peers.hf_assisted(
                config.engine.target_dir, config.engine.draft_dir, prompts, n, codec)
            if assisted:
                peers["hf assisted (1 at a time)"] = assisted
            peers["hf generate_batch (no spec)"] = bench_peers.hf_continuous_batching(
                config.engine.target_dir, prompts, n, codec)
        meta = {"command": "goodspec " + " ".join(sys.argv[1:]), "rates": rates, "policies": policies,
                "num_requests": args.num_requests, "repeats": args.repeats, "seed": args.seed, "machine": platform.platform(),
                "cpus": usable_cores(), "host_cpus": os.cpu_count(), "device": config.engine.device,
                "model": source_name(config.engine.target_dir), "chat": chat, "workload": args.workload}
        bench.write_results(Path(args.out), records, summaries, meta, peers)
    finally:
        if server is not None:
            server.stop()
        if group is not None:
            group.shutdown()
    print(bench.markdown_table(summaries))
    for line in bench.ratio_lines(bench.ratios(summaries)):
        print(line)
    if peers:
        print(bench.peers_table(peers))
    print(f"wrote {args.out}/results.json, results.md, latency.png", file=sys.stderr)
    return 1 if any(s.errors for s in summaries) else 0


def cmd_profile(args) -> int:
    from goodspec.config import model_pair
    from goodspec.workers.model_runner import ModelRunner, RunnerConfig
    from goodspec.workers.profiling import compare_forwards

    runner = ModelRunner(RunnerConfig(args.target or model_pair(args.model)[0], args.device, args.dtype,
                                      kv_cache_tokens=args.batch_size * (args.context + 64),
                                      cpu_linear=args.cpu_linear))
    b, ctx = args.batch_size, args.context
    decode, verify = compare_forwards(runner, b, 1, args.k + 1, ctx, args.repeats)
    linears = f", {runner.onednn_linears} oneDNN linears" if runner.onednn_linears else ""
    print(f"device {runner.device}, dtype {runner.dtype}{linears}, batch {b}, context {ctx}, "
          f"median of {args.repeats}")
    print(f"decode  1 token/seq : {decode.median_s * 1e3:8.2f} ms")
    print(f"verify {args.k + 1} tokens/seq: {verify.median_s * 1e3:8.2f} ms")
    print(f"verify / decode     : {verify.median_s / decode.median_s:8.2f}x")
    return 0


def cmd_overhead(args) -> int:
    import itertools

    from goodspec.cluster.group import EngineGroup
    from goodspec.overhead import measure_overhead
    from goodspec.sharegpt import first_turn_prompts
    from goodspec.workers.sampling import SamplingParams

    config = build_config(args)
    max_prompt_tokens = 256  # keeps the batch's contexts, and so its steps, comparable
    group = EngineGroup(config)
    try:
        fitting = (p for p, _ in first_turn_prompts(held_out=True)
                   if len(group.codec.encode(p)) <= max_prompt_tokens)
        prompts = list(itertools.islice(fitting, args.batch_size))
        if len(prompts) < args.batch_size:
            raise ValueError(f"only {len(prompts)} held-out prompts of <= {max_prompt_tokens} tokens")
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        group.complete_all(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm up
        for _ in range(args.repeats):
            for policy in policies:
                print(measure_overhead(group, prompts, policy, args.max_new_tokens, args.temperature).line(),
                      flush=True)
    finally:
        group.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "profile":
            return cmd_profile(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "overhead":
            return cmd_overhead(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "complete":
            return cmd_complete(args)
        if args.command == "health":
            return cmd_health(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"goodspec: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
