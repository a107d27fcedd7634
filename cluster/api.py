"""The gRPC boundary's two single places: request validation (proto -> engine input) and the
mapping of every error to a gRPC status. The servicer itself only converts and forwards."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from goodspec.config import ServerConfig
from goodspec.scheduler.errors import EngineUnhealthy, RequestRejected
from goodspec.scheduler.policy import PolicySpec
from goodspec.scheduler.request import FinishReason
from goodspec.scheduler.service import StreamChunk
from goodspec.v1 import generation_pb2 as pb
from goodspec.workers.sampling import SamplingParams

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS, FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}  # ERROR never reaches a client as a reason: the stream ends with UNAVAILABLE instead


class QueueFull(RuntimeError):
    pass


class Draining(RuntimeError):
    pass


class EngineFailed(RuntimeError):
    """The engine ended the request with an error (e.g. a worker that cannot be restarted)."""


MAX_REQUEST_ID_CHARS = 128  # echoed in every streamed chunk
MAX_MESSAGES = 256
CHAT_ROLES = ("system", "user", "assistant")


class DuplicateRequest(RuntimeError):
    """A request_id that is already in flight on this server (retry once it has ended)."""


@dataclass(frozen=True)
class GenerateInput:
    request_id: str  # the client's id, echoed back; the engine gets a unique one of its own
    prompt: str
    prompt_ids: list[int]
    sampling: SamplingParams
    policy: PolicySpec | None
    max_k: int | None


def validate(req: pb.GenerateRequest, codec, max_context: int, limits: ServerConfig) -> GenerateInput:
    """Raises ValueError naming the offending field. Sizes are checked before any work that
    grows with them (the prompt's bytes before tokenising it). Tokenises: call it off the event
    loop."""
    if len(req.request_id) > MAX_REQUEST_ID_CHARS or not req.request_id.isprintable():
        raise ValueError(f"request_id: at most {MAX_REQUEST_ID_CHARS} printable characters")
    if req.prompt and req.messages:
        raise ValueError("prompt, messages: set exactly one of them")
    field = "messages" if req.messages else "prompt"
    if len(req.messages) > MAX_MESSAGES:
        raise ValueError(f"messages: {len(req.messages)} turns; at most {MAX_MESSAGES}")
    num_bytes = sum(len(m.content.encode()) for m in req.messages) + len(req.prompt.encode())
    if num_bytes > limits.max_prompt_bytes:
        raise ValueError(f"{field}: {num_bytes} bytes is over the limit of {limits.max_prompt_bytes} "
                         f"(max_prompt_bytes)")
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role: {m.role[:32]!r} is not one of {', '.join(CHAT_ROLES)}")
    if not req.messages and not req.prompt.strip():
        raise ValueError("prompt: must not be empty (or send messages)")
    s = req.sampling
    if len(s.stop) > limits.max_stop_strings:
        raise ValueError(f"sampling.stop: {len(s.stop)} strings; at most {limits.max_stop_strings} "
                         f"(max_stop_strings)")
    if any(len(x) > limits.max_stop_chars for x in s.stop):
        raise ValueError(f"sampling.stop: a stop string is longer than {limits.max_stop_chars} "
                         f"characters (max_stop_chars)")
    limit = limits.max_new_tokens_limit or max_context
    if s.max_new_tokens == 0:
        raise ValueError("sampling.max_new_tokens: must be >= 1")
    if s.max_new_tokens > limit:
        raise ValueError(f"sampling.max_new_tokens: {s.max_new_tokens} is over the limit of {limit}")
    try:
        sampling = SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature if s.HasField("temperature") else 0.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else 0,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop), ignore_eos=s.ignore_eos,
        )
    except ValueError as e:
        raise ValueError(f"sampling.{e}") from None
    policy = None
    if req.speculation.policy:
        try:
            policy = PolicySpec.parse(req.speculation.policy)  # 'FIXED:05 ' and 'fixed:5' are one
        except ValueError as e:
            raise ValueError(f"speculation.policy: {e}") from None
    max_k = req.speculation.max_k if req.speculation.HasField("max_k") else None
    prompt = codec.render_chat([(m.role, m.content) for m in req.messages]) if req.messages else req.prompt
    prompt_ids = codec.encode(prompt)
    if len(prompt_ids) >= max_context:
        raise ValueError(f"{field}: {len(prompt_ids)} tokens; the model's context is {max_context}")
    return GenerateInput(req.request_id, prompt, prompt_ids, sampling, policy, max_k)


def to_response(chunk: StreamChunk, request_id: str) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, text=chunk.text, token_ids=chunk.token_ids)
    if chunk.finished:
        msg.finish_reason = FINISH_REASONS.get(chunk.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        u = chunk.usage
        if u is not None:
            msg.usage.CopyFrom(pb.Usage(
                prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                draft_tokens_proposed=u.draft_tokens_proposed,
                draft_tokens_accepted=u.draft_tokens_accepted, mean_k=u.mean_k,
                lookup_tokens_proposed=u.lookup_tokens_proposed, lookup_tokens_accepted=u.lookup_tokens_accepted))
    return msg


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Every error a request can meet, as the status a client sees. Never UNKNOWN."""
    if isinstance(exc, (ValueError, RequestRejected)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DuplicateRequest):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, (Draining, EngineUnhealthy, EngineFailed)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
