"""Python clients for a goodspec server: `GenerationClient` (blocking) and `AsyncGenerationClient`.

    with GenerationClient("localhost:50051") as c:
        for msg in c.generate("Hello", max_new_tokens=32):
            print(msg.text, end="", flush=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from goodspec.v1 import generation_pb2 as pb
from goodspec.v1 import generation_pb2_grpc as pb_grpc


def build_request(
    prompt: str, max_new_tokens: int = 64, temperature: float | None = None,
    top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
    stop: list[str] | tuple[str, ...] = (), ignore_eos: bool = False, policy: str = "",
    max_k: int | None = None, request_id: str = "",
    messages: list[dict] | list[tuple[str, str]] | None = None,
) -> pb.GenerateRequest:
    """`messages` (a conversation: {"role", "content"} dicts or (role, content) pairs) instead
    of a raw prompt: pass prompt="" with them."""
    sampling = pb.SamplingParams(max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    spec = pb.SpeculationParams(policy=policy)
    if max_k is not None:
        spec.max_k = max_k
    turns = [pb.Message(role=m["role"], content=m["content"]) if isinstance(m, dict)
             else pb.Message(role=m[0], content=m[1]) for m in messages or ()]
    return pb.GenerateRequest(request_id=request_id, prompt=prompt, sampling=sampling, speculation=spec,
                              messages=turns)


def _credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None):
    if tls_ca is None and tls_cert is None:
        return None
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


def _metadata(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else None


class GenerationClient:
    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 server_name: str | None = None) -> None:
        creds = _credentials(tls_ca, tls_cert, tls_key)
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self.channel = (grpc.secure_channel(address, creds, options) if creds
                        else grpc.insecure_channel(address, options))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = _metadata(token)

    def generate(self, prompt: str = "", timeout: float | None = None, **kw) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(build_request(prompt, **kw), timeout=timeout, metadata=self.metadata)

    def complete(self, prompt: str = "", timeout: float | None = None, **kw) -> pb.GenerateResponse:
        return self.stub.Complete(build_request(prompt, **kw), timeout=timeout, metadata=self.metadata)

    def model_info(self, timeout: float | None = 10) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def server_stats(self, timeout: float | None = 10) -> pb.ServerStats:
        return self.stub.GetServerStats(pb.GetServerStatsRequest(), timeout=timeout, metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = 5) -> str:
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GenerationClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGenerationClient:
    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        creds = _credentials(tls_ca, tls_cert, tls_key)
        self.channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = _metadata(token)

    async def generate(self, prompt: str = "", timeout: float | None = None, **kw) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.Generate(build_request(prompt, **kw), timeout=timeout, metadata=self.metadata)
        async for msg in call:
            yield msg

    async def complete(self, prompt: str = "", timeout: float | None = None, **kw) -> pb.GenerateResponse:
        return await self.stub.Complete(build_request(prompt, **kw), timeout=timeout, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncGenerationClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
