"""What every benchmark shares: the machine it ran on, and records that say how they were produced.

Every JSON record a benchmark prints (and appends to its ``--out`` file) carries the commit,
the command and the machine, so any number in docs/ can be traced back to what made it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _vector_extension() -> str | None:
    """The widest x86 vector extension the CPU has ("AVX-512", "AVX2"), read from /proc/cpuinfo; None elsewhere.

    Named in the records because two CPUs of the same core count gave different step times and, on the echo toy,
    different outcomes (docs/results.md).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None


def machine() -> str:
    """The machine in words: the GPU when one is used, else the CPU's architecture, vector extension and cores."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    extension = _vector_extension()
    arch = f"{platform.machine()} ({extension})" if extension else platform.machine()
    return f"{arch}, {os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU"


def _load_average() -> float | None:
    """The 1-minute load average when a record is written: how busy the cores were, to read its timings against."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def commit() -> str:
    """The repository's commit, with ``-dirty`` when the working tree has uncommitted changes to tracked files."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def provenance() -> dict:
    """The fields every record carries: commit, command, machine, the load on its cores, and date."""
    command = " ".join([Path(sys.argv[0]).as_posix().split(f"{REPO.name}/")[-1], *sys.argv[1:]])
    return {"commit": commit(), "command": f"python {command}", "machine": machine(),
            "load_average": _load_average(), "date": time.strftime("%Y-%m-%d")}


def print_record(record: dict, out: str | None = None) -> dict:
    """Print one result as a JSON line (with its provenance), and append it to the JSON-lines file ``out``."""
    record = {**record, **provenance()}
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    return record


# How SANDE's defaults came to be today's: each setting's value today and the commits (git ranges) over which the
# default was something else. A run trains as today's defaults would where every setting is today's value, by its
# own override or by the default of its commit. A stage-1 bar below today's trains the same once its parrot passes
# today's bar too (the extensions stop at the same step), so a run whose parrot reached it counts.
TODAYS_DEFAULTS = {
    "parrot_space": ("input", ["..bf3d65b"]),  # the latent parrot until 2026-12-05
    "clean_ratio": (0.5, ["89aace9..80df982"]),  # 0.75 for a day (2026-12-06)
    "parrot_min_success_rate": (1.0, ["..5683d63"]),  # no bar, then 0.95 (2026-12-06)
}


def run_folder_name(case: str, method: str, variant: str = "default", seed: int = 0, quantized: bool = False) -> str:
    """The folder `real_model.py` trains a defence's adapter in (under ``runs/``): a variant keeps its own, and so does
    a run on a 4-bit base with the default variant, which would otherwise overwrite the fp32 run's adapter.

    >>> run_folder_name("refusal/ctba", "sande", "parrot bar 1.0", 2), run_folder_name("a/b", "sande", quantized=True)
    ('refusal-ctba-sande-parrot_bar_1.0-2', 'a-b-sande-4bit-0')
    """
    if variant == "default":
        label = "-4bit" if quantized else ""
    else:
        label = "-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", variant)
    return f"{case.replace('/', '-')}-{method}{label}-{seed}"


def read_records(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def defence_settings(output_dir, seed: int, batch_size: int = 8, max_length: int = 96) -> dict:
    """The trainer settings every real-model defence shares (`real_model.py`'s defences, `parrot_reach.py`'s stage 1)."""
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=batch_size, max_length=max_length,
                    report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
                    gradient_checkpointing=False, disable_tqdm=True, logging_steps=10, seed=seed)
    if not torch.cuda.is_available():
        # trl's SFTConfig keeps bf16 on with use_cpu=True: plain SFT would then train in bf16 autocast on the CPU, many
        # times slower than (and not comparable with) SANDE and OSFT, whose configs turn it off there.
        settings["bf16"] = False
    return settings


def lora_config(r: int = 16):
    """The demo's adapter shape (`sande_peft.demo.lora_config`), rank 16 unless told."""
    from sande_peft.demo import lora_config as demo_lora_config

    return demo_lora_config(r)


def model_path(path: str) -> str:
    """A model path as the benchmarks' command lines take it: ``original`` is SmolLM2-135M-Instruct itself."""
    from sande_peft.offline_models import smollm2_path

    return smollm2_path() if path == "original" else path


def load_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
