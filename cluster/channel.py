"""A direct socket channel from an engine's scheduler to one of its worker actors.

Ray places, starts and restarts the workers; the per-step calls (propose, verify, free) do not go
through Ray's task path. A Ray actor call costs 2-4 ms here (task submission, scheduling, the
object store, two process wake-ups); on a 2-core machine that was a fifth of a batch-8 step. The
same call over one persistent TCP connection costs an encode and a loopback round trip.

Security (the port is reachable by whoever can reach the worker's address):
- the first bytes of a connection are a fixed-size handshake, `MAGIC + token` (36 bytes), read
  within `HANDSHAKE_TIMEOUT_S` and compared in constant time; nothing is decoded, and no buffer
  larger than the handshake is allocated, before it passes;
- at most `MAX_PENDING_HANDSHAKES` connections may be in their handshake at once (the rest are
  closed at accept), and at most `MAX_SESSIONS` authenticated ones (a new one closes the oldest:
  a scheduler that reconnects after a failure replaces its old connection);
- after the handshake, frames are `[4-byte length][message]`, at most `MAX_FRAME_BYTES`, and
  messages are typed (goodspec.cluster.wire): no pickle, ever;
- the worker binds loopback when its engine's actors share a node (STRICT_PACK), the node's
  address only when they may not.

One connection serves one caller at a time, in order, so a fire-and-forget `free` is done before
the next call runs.
"""

from __future__ import annotations

import collections
import hmac
import logging
import socket
import struct
import threading
import time
from typing import Any, Callable

from goodspec.cluster.wire import (
    WireError, decode_reply, decode_request, encode_error, encode_reply, encode_request,
)

log = logging.getLogger("goodspec.channel")

MAGIC = b"GSC1"
TOKEN_BYTES = 32  # secrets.token_hex(16): 32 ASCII characters
HANDSHAKE_TIMEOUT_S = 2.0
MAX_PENDING_HANDSHAKES = 8
MAX_SESSIONS = 4
MAX_FRAME_BYTES = 512 << 20  # a verify batch with draft probabilities: 64 x 8 x 49152 floats is 100 MB
_LEN = struct.Struct("!I")
_ACK = b"\x01"


class ChannelClosed(ConnectionError):
    """The other end went away (process died, closed the connection, or refused the token)."""


def new_token() -> str:
    import secrets

    return secrets.token_hex(TOKEN_BYTES // 2)


def _token_bytes(token: str) -> bytes:
    raw = token.encode()
    if len(raw) != TOKEN_BYTES:
        raise ValueError(f"a channel token is {TOKEN_BYTES} ASCII characters; got {len(raw)}")
    return raw


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ChannelClosed("connection closed by peer")
        got += r
    return buf


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    if len(payload) > MAX_FRAME_BYTES:
        raise WireError(f"message of {len(payload)} bytes is over the channel's {MAX_FRAME_BYTES}")
    sock.sendall(_LEN.pack(len(payload)) + payload)


def _recv_frame(sock: socket.socket) -> bytearray:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_FRAME_BYTES:
        raise WireError(f"peer announced a frame of {n} bytes (limit {MAX_FRAME_BYTES})")
    return _recv_exact(sock, n)


class ChannelServer:
    """Serves `handlers` (call name -> function of the decoded argument) on a daemon thread."""

    def __init__(self, handlers: dict[str, Callable[[Any], Any]], token: str, host: str = "127.0.0.1") -> None:
        self._handlers = handlers
        self._token = MAGIC + _token_bytes(token)
        self._listener = socket.create_server((host, 0))
        self.address: tuple[str, int] = (host, self._listener.getsockname()[1])
        self._pending = threading.BoundedSemaphore(MAX_PENDING_HANDSHAKES)
        self._sessions: collections.deque[socket.socket] = collections.deque()
        self._sessions_lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="goodspec-channel", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError as e:  # out of descriptors, a reset during accept, or closed
                if self._closed:
                    return
                log.warning("channel accept failed: %s", e)
                time.sleep(0.05)
                continue
            if not self._pending.acquire(blocking=False):
                conn.close()  # too many handshakes in progress: hold nothing for this one
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            except RuntimeError:  # cannot start a thread
                self._pending.release()
                conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            got = _recv_exact(conn, len(self._token))
            if not hmac.compare_digest(bytes(got), self._token):
                return False
            conn.sendall(_ACK)
            conn.settimeout(None)
            return True
        except (OSError, ChannelClosed):
            return False
        finally:
            self._pending.release()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if not self._handshake(conn):
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._register(conn)
            while True:
                method, arg, want_reply = decode_request(_recv_frame(conn))
                try:
                    reply = encode_reply(method, self._handlers[method](arg))
                except Exception as e:  # the caller decides what a worker error means
                    reply = encode_error(e)
                if want_reply:
                    _send_frame(conn, reply)
        except WireError as e:
            log.warning("channel: dropped a connection that broke the protocol: %s", e)
        except (ChannelClosed, OSError):
            pass
        finally:
            with self._sessions_lock:
                if conn in self._sessions:
                    self._sessions.remove(conn)
            conn.close()

    def _register(self, conn: socket.socket) -> None:
        with self._sessions_lock:
            self._sessions.append(conn)
            while len(self._sessions) > MAX_SESSIONS:
                old = self._sessions.popleft()
                try:
                    old.shutdown(socket.SHUT_RDWR)  # its thread sees the close and ends
                except OSError:
                    pass


class ChannelClient:
    """The caller's end: blocking calls with a timeout. Any transport failure closes it."""

    def __init__(self, address: tuple[str, int], token: str, timeout_s: float) -> None:
        self._sock = socket.create_connection(address, timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.sendall(MAGIC + _token_bytes(token))
            if _recv_exact(self._sock, 1) != _ACK:
                raise ChannelClosed("the worker did not accept the handshake")
        except BaseException:
            self.close()
            raise

    def call(self, method: str, arg: Any) -> Any:
        """Raises TimeoutError (socket.timeout), ChannelClosed/OSError on transport failure, or
        the exception the worker method raised."""
        try:
            _send_frame(self._sock, encode_request(method, arg, True))
            payload = _recv_frame(self._sock)
        except BaseException:
            self.close()
            raise
        try:
            return decode_reply(method, payload)
        except WireError as e:
            self.close()
            raise ChannelClosed(f"the worker sent a malformed {method} reply: {e}") from e

    def send(self, method: str, arg: Any) -> None:
        """Fire and forget; ordered before every later call on this channel."""
        try:
            _send_frame(self._sock, encode_request(method, arg, False))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
