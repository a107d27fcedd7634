"""A feature draft (EAGLE's idea): a small Llama that reads, beside each token, the target's last
hidden state at the position before it, and drafts further tokens from its own predicted states.

The draft directory is an ordinary Hugging Face Llama (loaded with AutoModelForCausalLM) plus
`feature_fc.safetensors`: one linear layer that mixes a token's embedding with the feature into
the decoder's input, `fc([embed(x_p); h_{p-1}])`. Position 0 reads a zero feature. The draft's
own post-norm last hidden state at p is its guess of the target's h_p: it is the feature of the
next drafted position, until the target's real one arrives with the verification.

transformers has no EAGLE model (vLLM and SGLang each carry their own), and the decoder here is
a stock LlamaForCausalLM: only this input layer is goodspec's.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

FEATURE_FILE = "feature_fc.safetensors"


@contextmanager
def block_outputs(blocks: nn.ModuleList, layers: tuple[int, ...] | list[int]):
    """While open, the output of each decoder block m in `layers` (1-based) of the last forward
    lands in the yielded dict under m (forward hooks, removed on exit): the rows a fused feature
    draft reads, at run time (ModelRunner.run) and for training (target_features)."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [blocks[m - 1].register_forward_hook(
        lambda _mod, _inp, out, m=m: captured.__setitem__(m, out[0] if isinstance(out, tuple) else out))
        for m in layers]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def normalised(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each row at unit RMS (no weight): how a middle layer's residual stream is read, whose
    scale varies by orders of magnitude between tokens."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class FeatureInput(nn.Module):
    """fc([embed(x_p); g_{p-1}]). g is the target's last hidden state, or with `target_layers`
    (EAGLE-3's fusion) `fuse([normalised outputs of those layers; last state])`; a drafted
    position reads the draft's own predicted state as g. The width of what it reads tells which."""

    def __init__(self, hidden: int, target_layers: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.hidden = hidden
        self.target_layers = tuple(target_layers)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.fuse = nn.Linear((len(target_layers) + 1) * hidden, hidden, bias=False) if target_layers else None

    @property
    def target_width(self) -> int:
        """The width of the target's rows this layer reads: (layers + 1) * d."""
        return (len(self.target_layers) + 1) * self.hidden

    def forward(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        f = features.to(embeds.dtype)
        if self.fuse is not None and f.shape[-1] == self.target_width:
            f = self.fuse(f)
        elif f.shape[-1] != self.hidden:
            raise ValueError(f"features must be {self.hidden} (a drafted state) or {self.target_width} "
                             f"(the target's) wide; got {f.shape[-1]}")
        return self.fc(torch.cat([embeds, f], -1))

    def read(self, embed_tokens: nn.Module, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The decoder's input for tokens `ids` (the draft's own ids) beside their features."""
        return self(embed_tokens(ids), features)

    @classmethod
    def identity(cls, hidden: int, feature_scale: float = 1.0) -> "FeatureInput":
        """Starts as embed + feature_scale * feature: with 1, the decoder first sees the sum of
        what it reads; with 0, exactly a token-only draft's input (training then adds what the
        features tell)."""
        m = cls(hidden)
        with torch.no_grad():
            eye = torch.eye(hidden)
            m.fc.weight.copy_(torch.cat([eye, eye * feature_scale], 1))
        return m

    def fused(self, target_layers: tuple[int, ...]) -> "FeatureInput":
        """This layer reading the outputs of `target_layers` as well, starting exactly as it is
        (the fusion passes the last state through and ignores the rest until trained)."""
        m = FeatureInput(self.hidden, target_layers)
        d = self.hidden
        with torch.no_grad():
            m.fc.weight.copy_(self.fc.weight)
            m.fuse.weight.zero_()
            m.fuse.weight[:, -d:].copy_(torch.eye(d))
        return m

    def save(self, model_dir: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"fc.weight": self.fc.weight.detach().to(torch.float16).contiguous()}
        if self.fuse is not None:
            tensors["fuse.weight"] = self.fuse.weight.detach().to(torch.float16).contiguous()
        save_file(tensors, str(model_dir / FEATURE_FILE),
                  metadata={"target_layers": ",".join(str(m) for m in self.target_layers)})

    @classmethod
    def load(cls, model_dir: Path, device: torch.device, dtype: torch.dtype) -> "FeatureInput | None":
        """The feature layer of a draft directory, or None for a draft that reads tokens only."""
        from safetensors import safe_open

        path = model_dir / FEATURE_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            layers_text = (f.metadata() or {}).get("target_layers", "")
        layers = tuple(int(m) for m in layers_text.split(",") if m)
        weight = tensors["fc.weight"]
        if weight.dim() != 2 or weight.shape[1] != 2 * weight.shape[0]:
            raise ValueError(f"{path}: fc.weight must be [d, 2d]; got {list(weight.shape)}")
        m = cls(weight.shape[0], layers)
        if (m.fuse is None) != ("fuse.weight" not in tensors) or (
                m.fuse is not None and tensors["fuse.weight"].shape != m.fuse.weight.shape):
            raise ValueError(f"{path}: target_layers {layers_text!r} and fuse.weight disagree")
        with torch.no_grad():
            m.fc.weight.copy_(weight)
            if m.fuse is not None:
                m.fuse.weight.copy_(tensors["fuse.weight"])
        return m.to(device=device, dtype=dtype).eval()


def is_feature_draft(model_dir: str | Path) -> bool:
    return (Path(model_dir) / FEATURE_FILE).is_file()
