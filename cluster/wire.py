"""The typed wire format of the scheduler-to-worker channel: no pickle, every field checked.

A message is one JSON header (UTF-8) and at most one raw tensor (the draft's probabilities),
laid out as `[4-byte header length][header][tensor bytes]`. Each call has one encoder and one
decoder for its argument and one each for its result, so what a peer can make the worker build
is exactly: ints, floats, bools, bounded strings, lists of those, and one tensor of an allowed
dtype whose byte count must match its shape. Anything else is a `WireError` and the connection
is dropped. (Pickle would let the peer build any object, and run code while doing it.)

Why not Ray's own serialisation: the per-step calls leave Ray's task path for speed (see
channel.py), and Ray's serialiser is pickle underneath.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable

import torch

from goodspec.workers.kv_cache import KVCacheFullError, UnknownSequenceError
from goodspec.workers.messages import (
    CONFIDENCE_BINS, DraftStop, ProposeBatch, ProposeItem, Proposal, VerifyBatch, VerifyItem, VerifyResult,
)
from goodspec.workers.sampling import SamplingParams

MAX_HEADER_BYTES = 16 << 20  # JSON part of one message
MAX_REQ_ID_CHARS = 256  # the gRPC edge allows 128; internal ids are shorter
_HEADER_LEN = struct.Struct("!I")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Worker errors the scheduler tells apart; any other type arrives as a RuntimeError naming it.
_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e for e in (UnknownSequenceError, KVCacheFullError, ValueError, KeyError, RuntimeError)
}


class WireError(ValueError):
    """A message that does not follow the schema: the peer is broken or hostile."""


# -- checked readers -------------------------------------------------------------------------
MAX_FEATURE_LAYERS = 8  # decoder blocks a fused feature draft may ask for


def _int(x: Any, lo: int = 0, hi: int = 1 << 62) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise WireError(f"expected an int in [{lo}, {hi}]; got {type(x).__name__}")
    return x


def _float(x: Any) -> float:
    if type(x) not in (int, float) or not math.isfinite(x):
        raise WireError(f"expected a finite number; got {type(x).__name__}")
    return float(x)


def _bool(x: Any) -> bool:
    if type(x) is not bool:
        raise WireError(f"expected a bool; got {type(x).__name__}")
    return x


def _str(x: Any, max_chars: int = MAX_REQ_ID_CHARS) -> str:
    if type(x) is not str or len(x) > max_chars:
        raise WireError(f"expected a string of at most {max_chars} characters")
    return x


def _list(x: Any) -> list:
    if type(x) is not list:
        raise WireError(f"expected a list; got {type(x).__name__}")
    return x


def _ids(x: Any) -> list[int]:
    return [_int(t, 0, 1 << 31) for t in _list(x)]


def _sampling(x: Any) -> SamplingParams:
    # Workers read only these four; the rest (stop strings, max_new_tokens) stay in the scheduler.
    temperature, top_k, top_p, seed = _list(x)
    try:
        return SamplingParams(temperature=_float(temperature), top_k=_int(top_k, 0, 1 << 31),
                              top_p=_float(top_p), seed=_int(seed, 0, (1 << 63) - 1))
    except ValueError as e:
        raise WireError(str(e)) from None


def _sampling_out(s: SamplingParams) -> list:
    return [s.temperature, s.top_k, s.top_p, s.seed]


# -- tensors -------------------------------------------------------------------------------------
def _tensor_header(t: torch.Tensor | None) -> tuple[dict | None, bytes]:
    if t is None:
        return None, b""
    t = t.detach().to("cpu").contiguous()  # never a device tensor on the wire
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise WireError(f"tensor dtype {name} cannot cross the channel")
    return {"dtype": name, "shape": list(t.shape)}, t.view(-1).view(torch.uint8).numpy().tobytes()


def _tensor(meta: Any, blob: memoryview) -> torch.Tensor | None:
    if meta is None:
        if len(blob):
            raise WireError("tensor bytes without a tensor header")
        return None
    if type(meta) is not dict or set(meta) != {"dtype", "shape"} or meta["dtype"] not in _DTYPES:
        raise WireError("bad tensor header")
    dtype = _DTYPES[meta["dtype"]]
    shape = [_int(d, 0, 1 << 31) for d in _list(meta["shape"])]
    if len(shape) > 4:
        raise WireError("tensor has too many dimensions")
    count = math.prod(shape)
    if count * dtype.itemsize != len(blob):
        raise WireError(f"tensor of shape {shape} needs {count * dtype.itemsize} bytes; got {len(blob)}")
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(blob, dtype=dtype).view(shape)


# -- the calls ---------------------------------------------------------------------------------
def _propose_out(b: ProposeBatch) -> tuple[Any, torch.Tensor | None]:
    items = [[i.req_id, i.start_pos, i.token_ids, i.num_draft, _sampling_out(i.sampling), i.may_stop] for i in b.items]
    stop = None if b.stop is None else [[list(r) for r in b.stop.rates], list(b.stop.next_rate),
                                        b.stop.row_cost, b.stop.pass_cost]
    return {"items": items, "stop": stop}, b.features


MAX_STOP_COST = 1e6  # DraftStop's costs, in tokens (a step's goodput level times seconds)


def _draft_stop(x: Any) -> DraftStop | None:
    if x is None:
        return None
    rates, next_rate, row_cost, pass_cost = _list(x)
    rates = _list(rates)
    if len(rates) != 2 or any(len(_list(r)) != CONFIDENCE_BINS for r in rates) or len(_list(next_rate)) != 2:
        raise WireError(f"a draft stop has two rows of {CONFIDENCE_BINS} rates and two next rates")
    costs = (_float(row_cost), _float(pass_cost))
    if not all(0.0 <= c <= MAX_STOP_COST for c in costs):
        raise WireError(f"draft stop costs must be in [0, {MAX_STOP_COST:g}]")
    return DraftStop(tuple(tuple(_unit(v) for v in r) for r in rates), tuple(_unit(v) for v in next_rate), *costs)


def _propose_in(h: Any, t: torch.Tensor | None) -> ProposeBatch:
    if type(h) is not dict or set(h) != {"items", "stop"}:
        raise WireError("bad propose batch")
    items = []
    for row in _list(h["items"]):
        req_id, start, ids, k, s, may_stop = _list(row)
        items.append(ProposeItem(_str(req_id), _int(start), _ids(ids), _int(k, 1, 1 << 16), _sampling(s),
                                 _bool(may_stop)))
    _feature_rows(t, sum(len(i.token_ids) for i in items))
    return ProposeBatch(items, t, _draft_stop(h["stop"]))


def _feature_rows(t: torch.Tensor | None, rows: int) -> None:
    """A feature tensor has one row per token it goes with (the worker checks its width)."""
    if t is not None and (t.dim() != 2 or t.shape[0] != rows):
        raise WireError(f"features must have {rows} rows of one feature each; got shape {list(t.shape)}")


def _unit(x: Any) -> float:
    v = _float(x)
    if not 0.0 <= v <= 1.0:
        raise WireError("expected a probability")
    return v


def _proposal_out(p: Proposal) -> tuple[Any, torch.Tensor | None]:
    return {"draft_ids": p.draft_ids, "elapsed_s": p.elapsed_s, "draft_conf": p.draft_conf}, p.draft_probs


def _proposal_in(h: Any, t: torch.Tensor | None) -> Proposal:
    if type(h) is not dict or set(h) != {"draft_ids", "elapsed_s", "draft_conf"}:
        raise WireError("bad proposal")
    conf = None if h["draft_conf"] is None else [[_unit(c) for c in _list(r)] for r in _list(h["draft_conf"])]
    return Proposal([_ids(r) for r in _list(h["draft_ids"])], t, _float(h["elapsed_s"]), conf)


def _verify_out(b: VerifyBatch) -> tuple[Any, torch.Tensor | None]:
    items = [[i.req_id, i.start_pos, i.token_ids, i.sample, _sampling_out(i.sampling), i.draft_ids,
              i.proposal_row] for i in b.items]
    proposal = None if b.proposal is None else {"draft_ids": b.proposal.draft_ids,  # the target
                                                 "elapsed_s": b.proposal.elapsed_s, "draft_conf": None}
    return ({"items": items, "proposal": proposal, "want_features": b.want_features,
             "feature_layers": list(b.feature_layers)},
            None if b.proposal is None else b.proposal.draft_probs)


def _verify_in(h: Any, t: torch.Tensor | None) -> VerifyBatch:
    if type(h) is not dict or set(h) != {"items", "proposal", "want_features", "feature_layers"}:
        raise WireError("bad verify batch")
    items = []
    for row in _list(h["items"]):
        req_id, start, ids, sample, s, draft, prow = _list(row)
        items.append(VerifyItem(_str(req_id), _int(start), _ids(ids), _bool(sample), _sampling(s),
                                _ids(draft), _int(prow, -1, 1 << 31)))
    proposal = None if h["proposal"] is None else _proposal_in(h["proposal"], t)
    if proposal is None and t is not None:
        raise WireError("tensor without a proposal")
    layers = _list(h["feature_layers"])
    if len(layers) > MAX_FEATURE_LAYERS:
        raise WireError(f"at most {MAX_FEATURE_LAYERS} feature layers; got {len(layers)}")
    return VerifyBatch(items, proposal, _bool(h["want_features"]), tuple(_int(m, 1, 1024) for m in layers))


def _result_out(r: VerifyResult) -> tuple[Any, torch.Tensor | None]:
    return [r.num_accepted, r.output_ids, r.elapsed_s], r.features


def _result_in(h: Any, t: torch.Tensor | None) -> VerifyResult:
    # (the scheduler checks the rows against its own batch: only it knows what it sent)
    accepted, outputs, elapsed = _list(h)
    return VerifyResult(_ids(accepted), [_ids(o) for o in _list(outputs)], _float(elapsed), t)


def _free_out(req_ids: list[str]) -> tuple[Any, None]:
    return list(req_ids), None


def _free_in(h: Any, t: torch.Tensor | None) -> list[str]:
    return [_str(r) for r in _list(h)]


def _none_out(_: None) -> tuple[None, None]:
    return None, None


def _none_in(h: Any, t: torch.Tensor | None) -> None:
    if h is not None or t is not None:
        raise WireError("expected no value")


@dataclass(frozen=True)
class Call:
    """One method of the channel: how its argument and its result cross the wire."""

    encode_arg: Callable[[Any], tuple[Any, torch.Tensor | None]]
    decode_arg: Callable[[Any, torch.Tensor | None], Any]
    encode_result: Callable[[Any], tuple[Any, torch.Tensor | None]]
    decode_result: Callable[[Any, torch.Tensor | None], Any]


CALLS: dict[str, Call] = {
    "propose": Call(_propose_out, _propose_in, _proposal_out, _proposal_in),
    "verify": Call(_verify_out, _verify_in, _result_out, _result_in),
    "free": Call(_free_out, _free_in, _none_out, _none_in),
}


# -- messages ----------------------------------------------------------------------------------
def pack(header: Any, tensor: torch.Tensor | None = None) -> bytes:
    meta, blob = _tensor_header(tensor)
    head = json.dumps({"h": header, "t": meta}, separators=(",", ":"), allow_nan=False).encode()
    head += b" " * (-(len(head) + _HEADER_LEN.size) % 8)  # the tensor starts 8-byte aligned
    return _HEADER_LEN.pack(len(head)) + head + blob


def unpack(payload: bytearray) -> tuple[Any, torch.Tensor | None]:
    view = memoryview(payload)
    if len(view) < _HEADER_LEN.size:
        raise WireError("message shorter than its header length")
    (n,) = _HEADER_LEN.unpack(view[:_HEADER_LEN.size])
    if n > MAX_HEADER_BYTES or _HEADER_LEN.size + n > len(view):
        raise WireError(f"header of {n} bytes does not fit the message")
    try:
        doc = json.loads(bytes(view[_HEADER_LEN.size:_HEADER_LEN.size + n]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError(f"header is not JSON: {e}") from None
    if type(doc) is not dict or set(doc) != {"h", "t"}:
        raise WireError("bad message envelope")
    return doc["h"], _tensor(doc["t"], view[_HEADER_LEN.size + n:])


def encode_request(method: str, arg: Any, want_reply: bool) -> bytes:
    header, tensor = CALLS[method].encode_arg(arg)
    return pack({"call": method, "reply": want_reply, "arg": header}, tensor)


def decode_request(payload: bytearray) -> tuple[str, Any, bool]:
    h, t = unpack(payload)
    if type(h) is not dict or set(h) != {"call", "reply", "arg"} or h["call"] not in CALLS:
        raise WireError("unknown call")
    return h["call"], CALLS[h["call"]].decode_arg(h["arg"], t), _bool(h["reply"])


def encode_reply(method: str, value: Any) -> bytes:
    header, tensor = CALLS[method].encode_result(value)
    return pack({"ok": header}, tensor)


def encode_error(exc: BaseException) -> bytes:
    name = type(exc).__name__
    kind = name if name in _ERRORS else "RuntimeError"
    message = str(exc) if kind == name else f"{name}: {exc}"
    return pack({"error": [kind, message[:4096]]})


def decode_reply(method: str, payload: bytearray) -> Any:
    """The call's result, or raises the worker's error (as one of the allowed types)."""
    h, t = unpack(payload)
    if type(h) is dict and set(h) == {"ok"}:
        return CALLS[method].decode_result(h["ok"], t)
    if type(h) is dict and set(h) == {"error"}:
        kind, message = _list(h["error"])
        raise _ERRORS.get(_str(kind, 64), RuntimeError)(_str(message, 4096))
    raise WireError("bad reply")
