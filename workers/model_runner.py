"""ModelRunner: one Hugging Face causal LM, its paged KV cache, and one packed forward per call."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from goodspec.gguf_import import model_path
from goodspec.workers.attention import ATTENTION_NAME, AttentionMetadata, attention_backends
from goodspec.workers.cpu_linear import to_onednn_linears, uses_onednn
from goodspec.workers.decoder_forward import LeanDecoder, fuse_projections
from goodspec.workers.dtypes import emulated_bfloat16_note, resolve_dtype
from goodspec.workers.feature_draft import FeatureInput, block_outputs, normalised
from goodspec.workers.int8_linear import INT8, to_int8_linears, uses_int8
from goodspec.workers.kv_cache import KVCacheSpec, PagedKVCache
from goodspec.workers.runner_config import RunnerConfig

log = logging.getLogger("goodspec.workers")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


VOCAB_MAP_FILE = "vocab_map.json"


@dataclass(frozen=True)
class VocabMap:
    """A draft that reads and predicts a subset of the target's vocabulary (the tokens that
    make up almost all of its outputs: FR-Spec). `target_ids[i]` is draft id i's target id; a
    target id outside the subset reads as draft id 0. Logits leave the runner in the target's
    vocabulary, -inf outside the subset, so q stays a distribution over the target's tokens and
    rejection sampling stays exact."""

    target_vocab_size: int
    target_ids: torch.Tensor  # [draft_vocab] int64
    to_draft: torch.Tensor  # [target_vocab] int64

    @classmethod
    def load(cls, model_dir: Path, device: torch.device) -> "VocabMap | None":
        import json

        path = model_dir / VOCAB_MAP_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        ids = torch.tensor(raw["target_ids"], dtype=torch.long)
        if not bool((ids[1:] > ids[:-1]).all()):
            # Sorted, so sampling in the draft's vocabulary walks the CDF in the target's order.
            raise ValueError(f"{path}: target_ids must be strictly increasing")
        to_draft = torch.zeros(raw["target_vocab_size"], dtype=torch.long)
        to_draft[ids] = torch.arange(len(ids))
        return cls(raw["target_vocab_size"], ids.to(device), to_draft.to(device))

    def to_target(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """[..., draft_vocab] -> [..., target_vocab], `fill` outside the draft's tokens
        (-inf for logits, 0 for probabilities)."""
        full = values.new_full((*values.shape[:-1], self.target_vocab_size), fill)
        full[..., self.target_ids] = values
        return full


def load_causal_lm(path: Path, device: torch.device, dtype: torch.dtype):
    """The model of a Hugging Face directory (a GGUF file goes through model_path first)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-file bar on every worker start is noise
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model at {path} (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=ATTENTION_NAME, local_files_only=True
    )
    return model.to(device).eval()


class ModelRunner:
    """Owns a model and its KV cache. `forward` appends tokens to many sequences at once."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        # On a GPU the host thread only launches kernels and builds small index tensors; torch's
        # pool of one thread per core made that slower (its threads spin between small ops and
        # against the controller's numpy). Closed batch on an H100 host of 16 cores: `off` 1.12
        # and 1.10 s with the default pools, 0.85 s between them with OMP/OpenBLAS/MKL at one
        # thread; on a second H100, this one torch thread alone ran as fast as all three pinned
        # (BENCHMARKS.md, GPU section). Ray's worker actors already get one thread each.
        threads = config.threads or (1 if self.device.type == "cuda" else 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.dtype = resolve_dtype(config.dtype, self.device, config.bfloat16_on_native_cpu)
        if (note := emulated_bfloat16_note(self.device, self.dtype)) is not None:
            log.warning("%s: %s", config.model_dir, note)
        int8 = uses_int8(config.int8_weights, self.device, self.dtype)  # refused before any loading
        path = model_path(config.model_dir)  # resolved once: a GGUF file is hashed to find its copy
        self.model = load_causal_lm(path, self.device, self.dtype)
        onednn = uses_onednn(config.cpu_linear, self.device, self.dtype)
        mc = self.model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.vocab_map = VocabMap.load(path, self.device)
        self.feature_input = FeatureInput.load(path, self.device, self.dtype)  # a feature draft's
        # The decoder's and output layer's linears only: a feature draft's input layer reads the
        # target's hidden states, whose outlier dimensions turn its int8 rounding into lost
        # acceptance (0.547 against 0.599 at fixed:1 with it int8, 0.603 without; int8_linear.py).
        self.int8_linears = to_int8_linears(self.model, packed=onednn) if int8 else 0
        # Each layer's q/k/v and gate/up joined before packing (decoder_forward.fuse_projections):
        # measured, and equal bit for bit, on packed float32 oneDNN linears only.
        self.fused_layers = fuse_projections(self.model) if onednn and not int8 and self.dtype == torch.float32 else 0
        # int8 layers pack their own dense weight for their larger inputs (int8_linear.py)
        self.onednn_linears = (self.int8_linears if int8 else to_onednn_linears(self.model)) if onednn else 0
        if onednn and self.feature_input is not None:  # packed, its products are the same bit for bit
            self.onednn_linears += to_onednn_linears(self.feature_input)  # (one row: 31 us against 52)
        # The weights: the dtype's name, or int8 (the dtype's with int8 copies for few-row inputs).
        self.weights: str = INT8 if self.int8_linears else str(self.dtype).removeprefix("torch.")
        # The decoder's forward without transformers' per-layer machinery, where the model's
        # layout is one it was checked on (decoder_forward.py); else None: transformers' forward.
        self.lean_decoder: LeanDecoder | None = LeanDecoder.for_model(self.model)
        self.hidden_size: int = mc.hidden_size
        self.vocab_size: int = self.vocab_map.target_vocab_size if self.vocab_map else mc.vocab_size
        self.model_vocab_size: int = mc.vocab_size  # the width of the model's own logits
        self.max_context: int = mc.max_position_embeddings
        self.cache = PagedKVCache(
            KVCacheSpec(
                num_layers=mc.num_hidden_layers,
                num_kv_heads=getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads,
                head_dim=head_dim,
                num_blocks=config.kv_cache_tokens // config.block_size,
                block_size=config.block_size,
            ),
            dtype=self.dtype,
            device=self.device,
        )

    def forward(
        self, seq_ids: list[str], starts: list[int], token_ids: list[list[int]], num_logits: list[int],
        target_vocab: bool = True,
    ) -> torch.Tensor:
        """Append token_ids[i] to sequence i at position starts[i] (rolling it back there first)
        and return the float32 logits of the last num_logits[i] new tokens of each sequence,
        concatenated in order: [sum(num_logits), vocab]. All or nothing on KV exhaustion.
        A reduced-vocabulary draft's logits come in the target's vocabulary unless
        `target_vocab=False` (then in its own; map ids with `target_ids`)."""
        return self.run(seq_ids, starts, token_ids, num_logits, target_vocab)[0]

    @torch.inference_mode()
    def run(
        self, seq_ids: list[str], starts: list[int], token_ids: list[list[int]], num_logits: list[int],
        target_vocab: bool = True, features: torch.Tensor | None = None, all_hidden: bool = False,
        layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, and the post-norm last hidden states: of every new token with `all_hidden`
        (what a feature draft reads), else of the tokens whose logits come back; with `layers`
        (and `all_hidden`), the RMS-normalised outputs of those decoder blocks (1-based) before
        it, [total, (len(layers) + 1) * d]. A feature draft reads `features` ([total new tokens,
        d or its FeatureInput.target_width], zeros when None) beside its tokens."""
        num_new = [len(t) for t in token_ids]
        if any(n == 0 for n in num_new):
            raise ValueError("every sequence in a forward needs at least one new token")
        for s, start, n in zip(seq_ids, starts, num_new):
            if start + n > self.max_context:
                raise ValueError(
                    f"sequence {s!r} would reach {start + n} tokens; the model's context is {self.max_context}"
                )
        total = sum(num_new)
        widths = {self.hidden_size} | ({self.feature_input.target_width} if self.feature_input is not None else set())
        if features is not None and (features.dim() != 2 or features.shape[0] != total
                                     or features.shape[1] not in widths):
            raise ValueError(f"features must be [{total}, one of {sorted(widths)}]; got {list(features.shape)}")
        blocks = self.model.model.layers
        if any(not 1 <= m <= len(blocks) for m in layers):
            raise ValueError(f"layers must be decoder blocks 1..{len(blocks)}; got {list(layers)}")
        self.cache.prepare(list(zip(seq_ids, starts, num_new)))
        meta, positions = AttentionMetadata.build(self.cache, seq_ids, starts, num_new, self.device)
        flat = [t for ids in token_ids for t in ids]
        input_ids = torch.tensor(flat, dtype=torch.long, device=self.device).unsqueeze(0)
        if self.vocab_map is not None:
            input_ids = self.vocab_map.to_draft[input_ids]
        kept_index = None if num_logits == num_new else self._kept_index(num_new, num_logits)  # None: every row
        base = self.model.model  # the decoder; the output layer runs on the kept rows only
        embeds = None  # a feature draft's inputs; any other model embeds its token ids itself
        if self.feature_input is not None:
            if features is None:
                features = torch.zeros(total, self.hidden_size)
            embeds = self.feature_input.read(base.embed_tokens, input_ids, features.to(self.device).unsqueeze(0))
        capture = layers if all_hidden else ()
        with attention_backends(self.device):
            if self.lean_decoder is not None:
                hidden, captured = self.lean_decoder(base.embed_tokens(input_ids) if embeds is None else embeds,
                                                     positions, meta, capture)
            else:
                inputs = {"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds}
                with block_outputs(blocks, capture) as captured:
                    hidden = base(**inputs, position_ids=positions.unsqueeze(0), use_cache=False,
                                  goodspec_meta=meta).last_hidden_state
        hidden = hidden[0]  # [total, d]
        kept = hidden if kept_index is None else hidden[kept_index]
        logits = self.model.lm_head(kept).float()
        if self.vocab_map is not None and target_vocab:
            logits = self.vocab_map.to_target(logits, float("-inf"))
        if all_hidden and layers:
            hidden = torch.cat([normalised(captured[m][0].float()).to(hidden.dtype) for m in layers] + [hidden], -1)
        return logits, hidden if all_hidden else kept

    def _kept_index(self, num_new: list[int], num_logits: list[int]) -> torch.Tensor:
        """Packed indices of the last num_logits[i] new tokens of each sequence."""
        ends = torch.cumsum(torch.tensor(num_new), 0)
        keep = torch.tensor(num_logits)
        seq_of_kept = torch.repeat_interleave(torch.arange(len(num_new)), keep)
        offset_in_kept = torch.arange(int(keep.sum())) - (torch.cumsum(keep, 0) - keep)[seq_of_kept]
        return ((ends - keep)[seq_of_kept] + offset_in_kept).to(self.device)

    def target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids of this model's own vocabulary as the target's."""
        return ids if self.vocab_map is None else self.vocab_map.target_ids[ids]

    def truncate(self, seq_id: str, length: int) -> None:
        self.cache.truncate(seq_id, length)

    def free(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self.cache.free(s)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
