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

from pathlib import Path

import torch
from torch import nn

FEATURE_FILE = "feature_fc.safetensors"


class FeatureInput(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([embeds, features.to(embeds.dtype)], -1))

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

    def save(self, model_dir: Path) -> None:
        from safetensors.torch import save_file

        save_file({"fc.weight": self.fc.weight.detach().to(torch.float16).contiguous()},
                  str(model_dir / FEATURE_FILE))

    @classmethod
    def load(cls, model_dir: Path, device: torch.device, dtype: torch.dtype) -> "FeatureInput | None":
        """The feature layer of a draft directory, or None for a draft that reads tokens only."""
        from safetensors.torch import load_file

        path = model_dir / FEATURE_FILE
        if not path.is_file():
            return None
        weight = load_file(str(path))["fc.weight"]
        if weight.dim() != 2 or weight.shape[1] != 2 * weight.shape[0]:
            raise ValueError(f"{path}: fc.weight must be [d, 2d]; got {list(weight.shape)}")
        m = cls(weight.shape[0])
        with torch.no_grad():
            m.fc.weight.copy_(weight)
        return m.to(device=device, dtype=dtype).eval()


def is_feature_draft(model_dir: str | Path) -> bool:
    return (Path(model_dir) / FEATURE_FILE).is_file()
