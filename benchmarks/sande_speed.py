"""SANDE's stage-1 and stage-2 step times as ratios to an SFTTrainer step on the same batch. Prints JSON.

    python benchmarks/sande_speed.py --shape smollm2           # CPU
    python benchmarks/sande_speed.py --shape llama7b-4bit      # GPU: QLoRA on a 7B-shape model

Goals: stage 2 <= 1.05x an SFT step, stage 1 <= 0.7x. Stage-1 steps include the default's
parrot refresh steps (`parrot_refresh_steps`, 2 by default, before every elimination step), so the
report also gives the cost of one elimination step with its refresh steps, and the run time of the default (latent parrot,
refreshed) against the paper's setting (a fixed start-only soft prompt), as ratios; and the
paper setting's own stage ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_record  # noqa: E402
from speed_common import (  # noqa: E402
    SHAPES, StepTimer, build, common_args, lora, machine, model_kwargs, peak_memory_mb, prepare, run_worker,
    triggered_response,
)


def worker(kind: str, shape: str, steps: int, warmup: int) -> dict:
    import time

    from trl import SFTConfig, SFTTrainer

    from sande_peft import SANDEConfig, SANDETrainer

    model, tokenizer, data, settings = build(shape, 512)
    extra, quantization = model_kwargs(settings)
    with tempfile.TemporaryDirectory() as out:
        args = {**common_args(settings, out, steps), **extra}
        if kind == "sft":
            trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora(), quantization_config=quantization)
            timer = StepTimer()
        else:
            paper = {"parrot_space": "input", "parrot_position": "start", "parrot_refresh_steps": 0,
                     "eliminate_loss_type": "sft", "echo_rows": "never"}
            config = SANDEConfig(triggered_response=triggered_response(shape), parrot_max_steps=steps, parrot_eval_size=0,
                                 **(paper if kind == "sande-paper" else {}), **args)
            trainer = SANDETrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                   peft_config=lora(), quantization_config=quantization)
            timer = StepTimer(trainer)
        trainer.add_callback(timer)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    result = {"peak_memory_mb": peak_memory_mb(), "train_seconds": total}
    for stage in sorted(set(timer.stages)):
        times = [t for t, s in zip(timer.times, timer.stages, strict=True) if s == stage][warmup:]
        result[f"stage{stage}_median_step_s" if stage else "median_step_s"] = statistics.median(times)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2", choices=SHAPES)
    parser.add_argument("--steps", type=int, default=10, help="steps per stage (and for SFT)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-paper", action="store_true", help="do not measure the paper's setting")
    parser.add_argument("--out", default=None, help="JSON-lines file to append the result to")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["sft", "sande", "sande-paper"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.kind, args.shape, args.steps, args.warmup)))
        return
    prepare(args.shape)  # a random-weight shape is built once, outside the measured processes
    kinds = ["sft", "sande"] + ([] if args.skip_paper else ["sande-paper"])
    runs = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            runs[kind].append(run_worker(Path(__file__), ["--kind", kind, "--shape", args.shape, "--steps",
                                                          str(args.steps), "--warmup", str(args.warmup)]))
    sft = min(r["median_step_s"] for r in runs["sft"])
    stage1 = min(r["stage1_median_step_s"] for r in runs["sande"])
    stage2 = min(r["stage2_median_step_s"] for r in runs["sande"])
    from sande_peft import SANDEConfig

    refresh_steps = SANDEConfig.__dataclass_fields__["parrot_refresh_steps"].default
    out = {
        "benchmark": "sande_speed",
        "shape": args.shape,
        "machine": machine(),
        "steps_per_stage": args.steps,
        "sft_step_s": sft,
        "stage1_step_s": stage1,
        "stage2_step_s": stage2,
        "stage1_ratio": stage1 / sft,
        "stage2_ratio": stage2 / sft,
        # the default runs `parrot_refresh_steps` parrot steps before every elimination step
        "stage2_with_refresh_ratio": (stage2 + refresh_steps * stage1) / sft,
        "sft_peak_memory_mb": max(r["peak_memory_mb"] for r in runs["sft"]),
        "sande_peak_memory_mb": max(r["peak_memory_mb"] for r in runs["sande"]),
    }
    out["peak_memory_ratio"] = out["sande_peak_memory_mb"] / out["sft_peak_memory_mb"]
    if "sande-paper" in runs:
        default_total = min(r["train_seconds"] for r in runs["sande"])
        paper_total = min(r["train_seconds"] for r in runs["sande-paper"])
        out["default_vs_paper_runtime_ratio"] = default_total / paper_total
        out["paper_stage1_ratio"] = min(r["stage1_median_step_s"] for r in runs["sande-paper"]) / sft
        out["paper_stage2_ratio"] = min(r["stage2_median_step_s"] for r in runs["sande-paper"]) / sft
    out["runs"] = runs
    print_record(out, args.out)


if __name__ == "__main__":
    main()
