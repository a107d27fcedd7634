"""One output stream per engine and consumer loop (goodspec.cluster.output_stream), on a real
local Ray with the tiny pair: it carries every request's chunks, batched per step, and a
consumer that goes away leaves nothing running on the engine."""

from __future__ import annotations

import asyncio
import time

from goodspec.workers.sampling import SamplingParams


def test_concurrent_requests_share_one_stream_that_carries_several_chunks_per_batch(group, sharegpt_prompts):
    engine = group.engines[0]
    prompts = sharegpt_prompts[:8]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)

    async def run():
        outs = await asyncio.gather(*(group.complete(p, params) for p in prompts))
        routers = list(engine.routers.values())
        return outs, routers

    outs, routers = asyncio.run(run())
    assert all(len(c.token_ids) == 24 for c in outs)
    assert len(routers) == 1, "one stream for all of the loop's requests"
    router = routers[0]
    # one chunk per request per step at the least; far fewer batches than chunks
    assert router.chunks >= 8 * 24 / 4 and router.batches * 2 < router.chunks, (router.batches, router.chunks)
    assert not engine.routers, "the loop closed and took its stream with it"


def test_a_consumer_loop_that_closes_mid_request_leaves_nothing_running(group, sharegpt_prompts):
    params = SamplingParams(max_new_tokens=2000, ignore_eos=True)

    async def walk_away():
        stream = group.generate(group.codec.encode(sharegpt_prompts[0]), params)
        async for _, chunk in stream:
            if chunk.token_ids:
                return  # the loop closes with the request unfinished

    asyncio.run(walk_away())
    steps_then = group.stats()[0].num_steps
    deadline = time.monotonic() + 20
    while (s := group.stats()[0]).running + s.waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.running == 0 and s.waiting == 0
    assert s.target_blocks_used == 0 and s.draft_blocks_used == 0
    # aborted, not run to its end: 2000 tokens take hundreds of steps at k = 3
    assert s.num_steps - steps_then < 100, s.num_steps - steps_then
    # and the engine still serves
    assert len(group.complete_all([sharegpt_prompts[1]], SamplingParams(max_new_tokens=4))[0].token_ids) == 4


def test_a_stopped_server_takes_its_streams_with_it(group):
    """A BackgroundServer (goodspec bench's, the tests') that stops closes the output streams
    read on its loop: the group is left with none of them (before, each stopped server left
    one open per engine)."""
    from goodspec.client import GenerationClient
    from tests.cluster.test_grpc import ServerThread

    s = ServerThread(group)
    try:
        with GenerationClient(s.address) as c:
            assert len(c.complete("Hello", max_new_tokens=2, ignore_eos=True).token_ids) == 2
        assert s.loop in group.engines[0].routers  # the server's loop reads the engine's stream
    finally:
        s.stop()
    assert s.loop not in group.engines[0].routers
