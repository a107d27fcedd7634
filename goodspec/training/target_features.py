"""The target's last hidden state at every position of the teacher's records: what a feature
draft (goodspec.workers.feature_draft, EAGLE's idea) reads beside each token. One padded
forward per batch of similar lengths, cached in resumable parts like the records themselves.

    python -m goodspec.training.target_features RECORDS_DIR [RECORDS_DIR ...]

writes `<RECORDS_DIR>-features/part-NNNN-M.pt`, one [len(prompt) + len(reply) - 1, d] bfloat16
tensor per record (the sequence the draft reads: the last reply token is never input)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from goodspec.training.teacher_data import length_batches, record_sequence, right_padded


@torch.no_grad()
def hidden_states(target, seqs: list[list[int]], batch_tokens: int, desc: str) -> list[torch.Tensor]:
    """The target's post-norm last hidden state for every token of every sequence (bfloat16)."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for idx in tqdm(length_batches([len(s) for s in seqs], batch_tokens), desc=desc, unit="batch", leave=False):
        ids, mask = right_padded([seqs[i] for i in idx])
        hidden = target.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for r, i in enumerate(idx):
            out[i] = hidden[r, :len(seqs[i])].to(torch.bfloat16).clone()
    return out  # type: ignore[return-value]


def features_dir(records_dir: Path) -> Path:
    return records_dir.with_name(records_dir.name + "-features")


def cached_features(target, records_dir: Path, batch_tokens: int = 3072,
                    max_parts: int | None = None) -> tuple[list[dict], list[torch.Tensor]]:
    """The records of `records_dir` (parts written by goodspec.training.teacher_data) and the
    target's features for each, computed once per part (resumable)."""
    out_dir = features_dir(records_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = sorted(records_dir.glob("part-*.pt"))[:max_parts]
    records: list[dict] = []
    feats: list[torch.Tensor] = []
    for part in tqdm(parts, desc=f"target features ({records_dir.name})", unit="part"):
        chunk = torch.load(part)
        cached = out_dir / part.name
        if not cached.is_file():
            hs = hidden_states(target, [record_sequence(r) for r in chunk], batch_tokens, part.name)
            torch.save(hs, cached.with_suffix(".tmp"))
            cached.with_suffix(".tmp").rename(cached)
        records.extend(chunk)
        feats.extend(torch.load(cached))
    return records, feats


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from goodspec.gguf_import import converted_dir, smollm2_gguf_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("records", type=Path, nargs="+")
    ap.add_argument("--max-parts", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # bfloat16, as the records were made: about twice as fast on this CPU as float32.
    target = AutoModelForCausalLM.from_pretrained(converted_dir(smollm2_gguf_path()),
                                                  dtype=torch.bfloat16).eval()
    for d in args.records:
        records, _ = cached_features(target, d, max_parts=args.max_parts)
        print(f"{len(records)} records' features under {features_dir(d)}")


if __name__ == "__main__":
    main()
