"""The target's last hidden state at every position of the teacher's records: what a feature
draft (goodspec.workers.feature_draft, EAGLE's idea) reads beside each token. One padded
forward per batch of similar lengths, cached in resumable parts like the records themselves.

    python -m goodspec.training.target_features RECORDS_DIR [RECORDS_DIR ...]

writes `<RECORDS_DIR>-features/part-NNNN-M.pt`, one [len(prompt) + len(reply) - 1, d] bfloat16
tensor per record (the sequence the draft reads: the last reply token is never input).

    python -m goodspec.training.target_features --layers 3,15 RECORDS_DIR [RECORDS_DIR ...]

writes the output of those decoder layers instead (`<RECORDS_DIR>-layer3/`, ...), each row
RMS-normalised (goodspec.workers.feature_draft.normalised: the residual stream of a middle
layer carries a few massive activations, 25000 at the first token here, 6 elsewhere), running
only the layers up to the deepest asked for: a fused feature draft (EAGLE-3) reads them."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from goodspec.training.teacher_data import length_batches, record_sequence, right_padded
from goodspec.workers.feature_draft import block_outputs, normalised


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


@torch.no_grad()
def layer_states(target, seqs: list[list[int]], layers: list[int], batch_tokens: int,
                 desc: str) -> dict[int, list[torch.Tensor]]:
    """The RMS-normalised output of decoder layers `layers` (1-based: layer m is the m-th block)
    for every token of every sequence (bfloat16); the blocks after the deepest one never run."""
    blocks = target.model.layers
    target.model.layers = blocks[:max(layers)]
    out: dict[int, list[torch.Tensor]] = {m: [None] * len(seqs) for m in layers}  # type: ignore[list-item]
    try:
        with block_outputs(blocks, layers) as captured:
            for idx in tqdm(length_batches([len(s) for s in seqs], batch_tokens), desc=desc, unit="batch",
                            leave=False):
                ids, mask = right_padded([seqs[i] for i in idx])
                target.model(input_ids=ids, attention_mask=mask)
                for m in layers:
                    h = normalised(captured[m].float())
                    for r, i in enumerate(idx):
                        out[m][i] = h[r, :len(seqs[i])].to(torch.bfloat16).clone()
    finally:
        target.model.layers = blocks
    return out


def features_dir(records_dir: Path, layer: int | None = None) -> Path:
    return records_dir.with_name(records_dir.name + ("-features" if layer is None else f"-layer{layer}"))


def cached_features(target, records_dir: Path, batch_tokens: int = 3072, max_parts: int | None = None,
                    layers: tuple[int, ...] = ()) -> tuple[list[dict], list[torch.Tensor]]:
    """The records of `records_dir` (parts written by goodspec.training.teacher_data) and the
    target's features for each, computed once per part (resumable): its last hidden state, or
    with `layers` the normalised outputs of those layers, concatenated in that order."""
    out_dirs = [features_dir(records_dir, m) for m in layers] or [features_dir(records_dir)]
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
    parts = sorted(records_dir.glob("part-*.pt"))[:max_parts]
    records: list[dict] = []
    feats: list[torch.Tensor] = []
    for part in tqdm(parts, desc=f"target features ({records_dir.name})", unit="part"):
        chunk = torch.load(part)
        cached = [d / part.name for d in out_dirs]
        if not all(c.is_file() for c in cached):
            seqs = [record_sequence(r) for r in chunk]
            if layers:
                per_layer = layer_states(target, seqs, list(layers), batch_tokens, part.name)
                computed = [per_layer[m] for m in layers]
            else:
                computed = [hidden_states(target, seqs, batch_tokens, part.name)]
            for c, hs in zip(cached, computed):
                torch.save(hs, c.with_suffix(".tmp"))
                c.with_suffix(".tmp").rename(c)
        records.extend(chunk)
        loaded = [torch.load(c) for c in cached]
        feats.extend(torch.cat(rows, -1) for rows in zip(*loaded))
    return records, feats


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from goodspec.gguf_import import converted_dir, smollm2_gguf_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("records", type=Path, nargs="+")
    ap.add_argument("--max-parts", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default="", help="comma-separated decoder layers (1-based) instead of the last state")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = tuple(int(m) for m in args.layers.split(",") if m)
    # bfloat16, as the records were made: about twice as fast on this CPU as float32.
    target = AutoModelForCausalLM.from_pretrained(converted_dir(smollm2_gguf_path()),
                                                  dtype=torch.bfloat16).eval()
    for d in args.records:
        records, _ = cached_features(target, d, max_parts=args.max_parts, layers=layers)
        print(f"{len(records)} records' features under {[str(features_dir(d, m)) for m in layers] or features_dir(d)}")


if __name__ == "__main__":
    main()
