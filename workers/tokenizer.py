"""Text <-> token ids for the scheduler and the front ends (the workers never see text)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextCodec:
    tokenizer: object  # a transformers tokenizer

    @classmethod
    def load(cls, target_dir: str, draft_dir: str | None = None) -> "TextCodec":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
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
