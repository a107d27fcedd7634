"""The scheduler-to-worker socket channel: typed calls, worker errors, ordering, and what an
unauthenticated or hostile peer can (not) do to the worker."""

from __future__ import annotations

import pickle
import socket
import struct
import threading
import time

import pytest
import torch

from goodspec.cluster import channel as ch
from goodspec.cluster.channel import ChannelClient, ChannelClosed, ChannelServer, new_token
from goodspec.workers.kv_cache import UnknownSequenceError
from goodspec.workers.messages import ProposeBatch, ProposeItem, Proposal, VerifyBatch, VerifyItem, VerifyResult
from goodspec.workers.sampling import SamplingParams

TOKEN = new_token()
GREEDY = SamplingParams(seed=7)


class _Worker:
    def __init__(self) -> None:
        self.freed: list[str] = []
        self.seen: list[object] = []

    def propose(self, batch: ProposeBatch) -> Proposal:
        self.seen.append(batch)
        probs = torch.arange(len(batch.items) * 2 * 5, dtype=torch.float32).view(len(batch.items), 2, 5)
        return Proposal([[1, 2]] * len(batch.items), probs, elapsed_s=0.25)

    def verify(self, batch: VerifyBatch) -> VerifyResult:
        self.seen.append(batch)
        if batch.items and batch.items[0].req_id == "gone":
            raise UnknownSequenceError("no cache for 'gone'")
        return VerifyResult([len(self.freed)], [[9, 8]], elapsed_s=0.5)

    def free(self, req_ids: list[str]) -> None:
        self.freed += req_ids


@pytest.fixture
def worker_and_server():
    w = _Worker()
    server = ChannelServer({"propose": w.propose, "verify": w.verify, "free": w.free}, TOKEN)
    yield w, server
    server.close()


class _Exploit:
    """Unpickling this writes a file: the proof that a peer ran code in the worker."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def test_typed_calls_round_trip_with_the_draft_probabilities(worker_and_server):
    w, server = worker_and_server
    c = ChannelClient(server.address, TOKEN, timeout_s=5)
    batch = ProposeBatch([ProposeItem("r1", 3, [5, 6], 2, GREEDY), ProposeItem("r2", 0, [7], 2, GREEDY)])
    p = c.call("propose", batch)
    assert w.seen[-1] == batch  # the worker got exactly what was sent
    assert p.draft_ids == [[1, 2], [1, 2]] and p.elapsed_s == 0.25
    assert torch.equal(p.draft_probs, torch.arange(20, dtype=torch.float32).view(2, 2, 5))
    vb = VerifyBatch([VerifyItem("r1", 3, [5], True, SamplingParams(temperature=0.7, top_p=0.9, seed=3),
                                 [1, 2], 0)], p)
    assert c.call("verify", vb) == VerifyResult([0], [[9, 8]], 0.5)
    got = w.seen[-1]
    assert got.items == vb.items and torch.equal(got.proposal.draft_probs, p.draft_probs)
    c.close()


def test_a_feature_draft_s_hidden_states_cross_both_ways_and_bad_row_counts_are_refused():
    from goodspec.cluster import wire

    feats = torch.rand(3, 4).to(torch.bfloat16)
    batch = ProposeBatch([ProposeItem("r1", 3, [5, 6], 2, GREEDY), ProposeItem("r2", 0, [7], 2, GREEDY)], feats)
    codec = wire.CALLS["propose"]
    got = codec.decode_arg(*wire.unpack(bytearray(wire.pack(*codec.encode_arg(batch)))))
    assert got.items == batch.items and torch.equal(got.features, feats)
    short = ProposeBatch(batch.items, feats[:2])  # a row short: refused before any worker code
    with pytest.raises(wire.WireError, match="3 rows"):
        codec.decode_arg(*wire.unpack(bytearray(wire.pack(*codec.encode_arg(short)))))
    verify = wire.CALLS["verify"]
    vb = VerifyBatch([VerifyItem("r1", 3, [5], True, GREEDY, [1, 2], 0)], None, want_features=True,
                     feature_layers=(3, 15))
    got_vb = verify.decode_arg(*wire.unpack(bytearray(wire.pack(*verify.encode_arg(vb)))))
    assert got_vb.want_features and got_vb.feature_layers == (3, 15)
    for bad in ((0,), tuple(range(1, 10))):  # block 0 does not exist; more layers than the bound
        h, t = verify.encode_arg(VerifyBatch(vb.items, None, True, bad))
        with pytest.raises(wire.WireError):
            verify.decode_arg(*wire.unpack(bytearray(wire.pack(h, t))))
    result = VerifyResult([1], [[9, 8]], 0.5, feats[:2])
    back = verify.decode_result(*wire.unpack(bytearray(wire.pack(*verify.encode_result(result)))))
    assert back.num_accepted == [1] and torch.equal(back.features, feats[:2])


def test_a_draft_stop_crosses_typed_and_out_of_range_ones_are_refused():
    from goodspec.cluster import wire
    from goodspec.workers.messages import CONFIDENCE_BINS, DraftStop

    rates = tuple(b / CONFIDENCE_BINS for b in range(CONFIDENCE_BINS))
    stop = DraftStop((rates, rates[::-1]), (0.6, 0.4), 0.25, 0.75)
    batch = ProposeBatch([ProposeItem("r1", 3, [5, 6], 4, GREEDY, True), ProposeItem("r2", 0, [7], 2, GREEDY)],
                         None, stop)
    codec = wire.CALLS["propose"]

    def round_trip(b):
        return codec.decode_arg(*wire.unpack(bytearray(wire.pack(*codec.encode_arg(b)))))

    got = round_trip(batch)
    assert got == batch and [it.may_stop for it in got.items] == [True, False]
    for bad in (DraftStop((rates, rates[:-1]), (0.6, 0.4), 0.25, 0.75),  # a bin short
                DraftStop((rates, (1.5,) * CONFIDENCE_BINS), (0.6, 0.4), 0.25, 0.75),  # not a probability
                DraftStop((rates, rates), (0.6,), 0.25, 0.75),  # one next rate
                DraftStop((rates, rates), (0.6, 0.4), -1.0, 0.75),  # a negative cost
                DraftStop((rates, rates), (0.6, 0.4), 0.25, 1e9)):  # past the bound
        with pytest.raises(wire.WireError):
            round_trip(ProposeBatch(batch.items, None, bad))


def test_worker_errors_arrive_typed_and_free_is_ordered_before_the_next_call(worker_and_server):
    w, server = worker_and_server
    c = ChannelClient(server.address, TOKEN, timeout_s=5)
    with pytest.raises(UnknownSequenceError, match="no cache"):
        c.call("verify", VerifyBatch([VerifyItem("gone", 0, [1], True, GREEDY)]))
    c.send("free", ["a", "b"])  # no reply, but done before the next call runs
    assert c.call("verify", VerifyBatch([VerifyItem("r", 0, [1], True, GREEDY)])).num_accepted == [2]
    assert w.freed == ["a", "b"]


def test_wrong_token_is_refused_at_connect(worker_and_server):
    _, server = worker_and_server
    with pytest.raises((ChannelClosed, OSError)):
        ChannelClient(server.address, new_token(), timeout_s=5)


def test_a_reconnecting_caller_is_served_while_the_old_connection_lingers(worker_and_server):
    _, server = worker_and_server
    a = ChannelClient(server.address, TOKEN, timeout_s=5)
    b = ChannelClient(server.address, TOKEN, timeout_s=5)
    one = VerifyBatch([VerifyItem("r", 0, [1], True, GREEDY)])
    assert a.call("verify", one).output_ids == b.call("verify", one).output_ids == [[9, 8]]


def _send_pickle_frames(address, path: str, token: bytes | None) -> None:
    """The old wire format's attack: a length-prefixed pickle, as the first frame or after the
    handshake, with an 8-byte and a 4-byte length."""
    payload = pickle.dumps(_Exploit(path))
    for prefix in (struct.pack("!Q", len(payload)), struct.pack("!I", len(payload))):
        with socket.create_connection(address, timeout=5) as s:
            if token is not None:
                s.sendall(token)
                s.recv(1)
            s.sendall(prefix + payload)
            s.settimeout(3)
            try:
                s.recv(1)  # the server closes the connection rather than answer
            except OSError:
                pass


def test_a_pickle_frame_runs_no_code_before_or_after_the_handshake(worker_and_server, tmp_path):
    _, server = worker_and_server
    marker = tmp_path / "pwned"
    _send_pickle_frames(server.address, str(marker), None)
    _send_pickle_frames(server.address, str(marker), ch.MAGIC + TOKEN.encode())  # even the token holder
    time.sleep(0.2)
    assert not marker.exists()
    c = ChannelClient(server.address, TOKEN, timeout_s=5)  # and the worker still serves
    assert c.call("verify", VerifyBatch([VerifyItem("r", 0, [1], True, GREEDY)])).output_ids == [[9, 8]]


def test_a_huge_frame_announced_before_or_after_the_handshake_allocates_nothing(worker_and_server):
    import psutil

    _, server = worker_and_server
    proc = psutil.Process()
    before = proc.memory_info().rss
    socks = []
    for first in (b"", ch.MAGIC + TOKEN.encode()):
        s = socket.create_connection(server.address, timeout=5)
        s.sendall(first + struct.pack("!Q", 1 << 30) + struct.pack("!I", (1 << 32) - 1))
        socks.append(s)
    time.sleep(0.5)
    assert proc.memory_info().rss - before < 64 << 20
    for s in socks:
        s.close()


def test_idle_connections_hold_no_threads_and_time_out(worker_and_server, monkeypatch):
    monkeypatch.setattr(ch, "HANDSHAKE_TIMEOUT_S", 0.5)
    _, server = worker_and_server
    threads_before = threading.active_count()
    idle = [socket.create_connection(server.address, timeout=5) for _ in range(200)]
    time.sleep(0.2)
    assert threading.active_count() - threads_before <= ch.MAX_PENDING_HANDSHAKES
    time.sleep(0.8)  # past the handshake timeout, every slot is free again
    c = ChannelClient(server.address, TOKEN, timeout_s=5)
    assert c.call("verify", VerifyBatch([VerifyItem("r", 0, [1], True, GREEDY)])).output_ids == [[9, 8]]
    for s in idle:
        s.close()


def test_malformed_messages_from_an_authenticated_peer_drop_only_that_connection(worker_and_server):
    _, server = worker_and_server
    bad = [
        b"\x00\x00\x00\x05{bad}",  # not JSON
        b"\x00\x00\x00\x02{}",  # wrong envelope
        struct.pack("!I", 1000) + b"{}",  # header length beyond the message
    ]
    for frame in bad:
        with socket.create_connection(server.address, timeout=5) as s:
            s.sendall(ch.MAGIC + TOKEN.encode())
            assert s.recv(1) == b"\x01"
            s.sendall(struct.pack("!I", len(frame)) + frame)
            s.settimeout(3)
            assert s.recv(1) == b""  # closed, no reply
    c = ChannelClient(server.address, TOKEN, timeout_s=5)
    assert c.call("verify", VerifyBatch([VerifyItem("r", 0, [1], True, GREEDY)])).output_ids == [[9, 8]]


def test_a_worker_channel_listens_on_loopback_when_its_engine_shares_a_node():
    from goodspec.cluster.group import channel_host_for

    assert channel_host_for("STRICT_PACK") == "127.0.0.1"
    assert channel_host_for("SPREAD") is None  # the node's address: the scheduler may be elsewhere
