"""Text <-> token ids for the scheduler and the front ends (the workers never see text)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextCodec:
    tokenizer: object  # a transformers tokenizer

    @classmethod
    def load(cls, target_dir: str, draft_dir: str | None = None) -> "TextCodec":
        from pathlib import Path

        from transformers import AutoTokenizer

        for d in (target_dir, draft_dir):
            if d is not None and not (Path(d) / "config.json").is_file():
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

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_output(self, ids: list[int], stop: tuple[str, ...] = ()) -> str:
        """The completion's text, cut before the first stop string."""
        text = self.decode(ids)
        cuts = [text.find(s) for s in stop if s and s in text]
        return text[: min(cuts)] if cuts else text

    def find_stop(self, output_ids: list[int], stop: tuple[str, ...], num_new: int) -> int | None:
        """Number of output tokens to keep when a stop string appeared: the shortest prefix whose
        text contains one (the text is cut before it by decode_output), else None."""
        if not any(s and s in self.decode(output_ids) for s in stop):
            return None
        for n in range(max(1, len(output_ids) - num_new), len(output_ids) + 1):
            text = self.decode(output_ids[:n])
            if any(s and s in text for s in stop):
                return n
        return len(output_ids)


class IncrementalDetokenizer:
    """Text deltas for a stream. Holds back text that may still change: a trailing partial UTF-8
    character (decoded as U+FFFD) and any tail that could be the start of a stop string."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...] = ()) -> None:
        self.codec = codec
        self.stop = tuple(s for s in stop if s)
        self.sent = 0  # characters of the final text already emitted

    def update(self, output_ids: list[int], final: bool = False) -> str:
        text = self.codec.decode_output(output_ids, self.stop)
        if not final:
            safe = len(text)
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for s in self.stop:
                for n in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:n]):
                        safe -= n
                        break
            text = text[:safe]
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta
