"""Text <-> token ids for the scheduler and the front ends (the workers never see text)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextCodec:
    tokenizer: object  # a transformers tokenizer

    @classmethod
    def load(cls, target_dir: str, draft_dir: str | None = None) -> "TextCodec":
        from transformers import AutoTokenizer

        from goodspec.gguf_import import model_path

        # A GGUF file converts here, once, with a progress bar; each path is resolved once.
        target_dir = model_path(target_dir)
        draft_dir = model_path(draft_dir) if draft_dir is not None else None
        for d in (target_dir, draft_dir):
            if d is not None and not (d / "config.json").is_file():
                raise FileNotFoundError(f"no Hugging Face model at {d} (config.json missing)")
        tok = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
        # Length limits are the scheduler's job (with a clear error); silence the tokenizer's own.
        tok.model_max_length = 1 << 40
        if draft_dir is not None:
            draft_tok = AutoTokenizer.from_pretrained(draft_dir, local_files_only=True)
            if draft_tok.get_vocab() != tok.get_vocab():
                raise ValueError(
                    f"draft {draft_dir} and target {target_dir} have different tokenizers; "
                    "speculative decoding needs one shared vocabulary"
                )
        return cls(tok)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render_chat(self, messages: list[tuple[str, str]]) -> str:
        """A conversation of (role, content) turns as the prompt text the target was tuned on:
        its chat template, with the assistant's generation prompt added. Generation then ends
        at the template's end-of-turn token, the model's EOS."""
        if not self.has_chat_template:
            raise ValueError("messages: this model has no chat template; send a prompt instead")
        turns = [{"role": role, "content": content} for role, content in messages]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def decode_output(self, ids: list[int], stop: tuple[str, ...] = ()) -> str:
        """The completion's text, cut before the first stop string."""
        text = self.decode(ids)
        cuts = [text.find(s) for s in stop if s and s in text]
        return text[: min(cuts)] if cuts else text

    def find_stop(self, output_ids: list[int], stop: tuple[str, ...], num_new: int) -> int | None:
        """Number of output tokens to keep when a stop string appeared in the last `num_new`
        tokens: the shortest prefix whose text contains one (the text is cut before it by
        decode_output), else None. Called every step: it decodes only a window of tokens that
        can hold a stop string ending in the new ones (a character is at most 4 byte-level
        tokens), so its cost does not grow with the output's length."""
        stops = [s for s in stop if s]
        if not stops or num_new <= 0:
            return None
        start = max(0, len(output_ids) - num_new - 4 * max(len(s) for s in stops) - 1)
        window = self.decode(output_ids[start:])
        if not any(s in window for s in stops):
            return None
        for n in range(max(start + 1, len(output_ids) - num_new), len(output_ids) + 1):
            text = self.decode(output_ids[start:n])
            if any(s in text for s in stops):
                return n
        return len(output_ids)


class IncrementalDetokenizer:
    """Text deltas for a stream, decoding only the new tokens (with a few tokens of left context
    for correct spacing), so a step costs the same at token 10 and token 10,000. Holds back text
    that may still change: a trailing partial UTF-8 character (decoded as U+FFFD) and any tail
    that could be the start of a stop string. Ends the text before the first stop string."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...] = ()) -> None:
        self.codec = codec
        self.stop = tuple(s for s in stop if s)
        self.prefix = 0  # first token of the context decoded again for spacing
        self.read = 0  # tokens whose text has been taken
        self.pending = ""  # decoded text held back (could begin a stop string)
        self.stopped = False

    def update(self, output_ids: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        text = self.pending + self._new_text(output_ids, final)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.stopped, self.pending = True, ""
            return text[: min(cuts)]
        hold = 0 if final else _longest_stop_prefix_at_end(text, self.stop)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def _new_text(self, ids: list[int], final: bool) -> str:
        if len(ids) <= self.read:
            return ""
        seen = self.codec.decode(ids[self.prefix:self.read])
        end, full = len(ids), self.codec.decode(ids[self.prefix:])
        if not final and full.endswith("\ufffd"):
            # A character split across tokens (at most 4 bytes) decodes as U+FFFD until its
            # last byte arrives: emit up to the last clean cut and wait for the rest. With no
            # clean cut in the last 4 tokens the bytes are invalid, and stay as they are.
            for cut in range(len(ids) - 1, max(self.read, len(ids) - 4) - 1, -1):
                text = self.codec.decode(ids[self.prefix:cut])
                if not text.endswith("\ufffd"):
                    end, full = cut, text
                    break
        if end == self.read:
            return ""  # nothing complete yet: keep the context as it is
        self.prefix, self.read = max(self.read, end - 6), end
        return full[len(seen):]


def _longest_stop_prefix_at_end(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string (and is shorter than
    it): the text to hold back. Tries only the places where a stop's first character occurs."""
    best = 0
    for s in stops:
        tail = text[len(text) - min(len(text), len(s) - 1):]
        i = tail.find(s[0])
        while i != -1 and len(tail) - i > best:
            if s.startswith(tail[i:]):
                best = len(tail) - i
                break
            i = tail.find(s[0], i + 1)
    return best
