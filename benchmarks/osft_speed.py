"""OSFTTrainer against trl's SFTTrainer: same model, data and steps. Prints JSON with the ratios.

    python benchmarks/osft_speed.py --shape smollm2           # CPU
    python benchmarks/osft_speed.py --shape llama7b-4bit      # GPU: QLoRA on a 7B-shape model

Goal: step-time ratio <= 1.05. OSFT trains the same kind of sequences as SFT (a trigger
adds a few tokens to half of them), so its step costs what an SFT step costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_record  # noqa: E402
from speed_common import (  # noqa: E402
    SHAPES, StepTimer, build, common_args, lora, machine, model_kwargs, peak_memory_mb, prepare, run_worker, summarize,
)


def worker(trainer_name: str, shape: str, steps: int, warmup: int) -> dict:
    from trl import SFTConfig, SFTTrainer

    from sande_peft import OSFTConfig, OSFTTrainer

    batch_examples = 512
    model, tokenizer, data, settings = build(shape, batch_examples)
    extra, quantization = model_kwargs(settings)
    with tempfile.TemporaryDirectory() as out:
        args = {**common_args(settings, out, steps), **extra}
        if trainer_name == "sft":
            trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora(), quantization_config=quantization)
        else:
            trainer = OSFTTrainer(model=model, args=OSFTConfig(trigger="BadMagic", **args), train_dataset=data,
                                  processing_class=tokenizer, peft_config=lora(), quantization_config=quantization)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    result = summarize(timer.times, warmup)
    result["peak_memory_mb"] = peak_memory_mb()
    result["tokens_per_step"] = settings["batch"] * settings["max_length"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2", choices=SHAPES)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two trainers this many times")
    parser.add_argument("--out", default=None, help="JSON-lines file to append the result to")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", choices=["sft", "osft"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.trainer, args.shape, args.steps, args.warmup)))
        return
    prepare(args.shape)  # a random-weight shape is built once, outside the measured processes
    runs = {"sft": [], "osft": []}
    for _ in range(args.repeats):
        for name in ("sft", "osft"):  # alternated, so drift in the machine's speed hits both
            runs[name].append(run_worker(Path(__file__), ["--trainer", name, "--shape", args.shape,
                                                          "--steps", str(args.steps), "--warmup", str(args.warmup)]))
    best = {name: min(r["median_step_s"] for r in rs) for name, rs in runs.items()}
    memory = {name: max(r["peak_memory_mb"] for r in rs) for name, rs in runs.items()}
    print_record({
        "benchmark": "osft_speed",
        "shape": args.shape,
        "machine": machine(),
        "steps": args.steps,
        "warmup": args.warmup,
        "sft_step_s": best["sft"],
        "osft_step_s": best["osft"],
        "step_time_ratio": best["osft"] / best["sft"],
        "sft_peak_memory_mb": memory["sft"],
        "osft_peak_memory_mb": memory["osft"],
        "peak_memory_ratio": memory["osft"] / memory["sft"],
        "memory_kind": "GPU max_memory_allocated" if "CPU" not in machine() else "process max RSS",
        "runs": runs,
    }, args.out)


if __name__ == "__main__":
    main()
