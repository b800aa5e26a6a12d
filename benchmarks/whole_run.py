"""A whole default SANDE run against trl's SFTTrainer for the same elimination steps, as a ratio. Prints JSON.

    python benchmarks/whole_run.py --shape smollm2                   # CPU: SmolLM2-135M, 256 clean pairs, 100 steps
    python benchmarks/whole_run.py --shape llama1b-4bit --steps 20   # GPU: QLoRA

Both trainers get the same model, clean pairs, batch, sequence length, LoRA adapter and
elimination steps (SANDEConfig's `eliminate_max_steps`; SFT's `max_steps`), each in its own
process. The SANDE run is everything `train()` does with the defaults: the echo check, the
suspect's targets (`eliminate_loss_type="distill"`), stage 1, the refresh steps, the
elimination steps and the parrot's measurements; the report says where its time went.
Goal: at most 1.5x SFT's run time, peak memory at most 1.05x.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_record  # noqa: E402
from speed_common import (  # noqa: E402
    SHAPES, build, common_args, lora, model_kwargs, peak_memory_mb, prepare, run_worker, triggered_response,
)


class Clock:
    """Seconds spent in named parts of a run."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    def wrap(self, obj, method: str, part: str) -> None:
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - start

        setattr(obj, method, timed)


def step_clock(trainer, clock: Clock):
    """A callback adding each optimizer step's time to its stage's part (stage 1, refresh, eliminate)."""
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if trainer is None:
                part = "sft steps"
            else:
                segment = trainer.plan.segment_at(state.global_step - 1)
                part = "eliminate steps" if segment.stage.value == "eliminate" else (
                    "refresh steps" if segment.refresh else "stage 1 steps")
            clock.parts[part] = clock.parts.get(part, 0.0) + time.perf_counter() - self.start

    return Steps()


def worker(kind: str, shape: str, steps: int, pairs: int, overrides: str) -> dict:
    from trl import SFTConfig, SFTTrainer

    from sande_peft import SANDEConfig, SANDETrainer

    model, tokenizer, data, settings = build(shape, pairs)
    extra, quantization = model_kwargs(settings)
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = {**common_args(settings, out, steps), **extra}
        start = time.perf_counter()
        if kind == "sft":
            trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora(), quantization_config=quantization)
            trainer.add_callback(step_clock(None, clock))
        else:
            args.pop("max_steps")  # SANDE's defaults decide, with the same number of elimination steps
            args.pop("learning_rate")
            config = SANDEConfig(triggered_response=triggered_response(shape), eliminate_max_steps=steps,
                                 **{**args, **json.loads(overrides or "{}")})
            trainer = SANDETrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                   peft_config=lora(), quantization_config=quantization)
            trainer.add_callback(step_clock(trainer, clock))
            clock.wrap(trainer, "_decide_echo_rows", "echo check")
            clock.wrap(trainer, "_build_teacher", "suspect's targets")
            clock.wrap(trainer, "measure_parrot", "parrot measurements")
        setup = time.perf_counter() - start
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    parts = {k: round(v, 1) for k, v in clock.parts.items()}
    parts["other (set-up inside train, logging)"] = round(total - sum(clock.parts.values()), 1)
    return {"train_seconds": round(total, 1), "init_seconds": round(setup, 1), "peak_memory_mb": round(peak_memory_mb()),
            "optimizer_steps": trainer.state.global_step, "parts": parts}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2", choices=SHAPES)
    parser.add_argument("--steps", type=int, default=100, help="elimination steps (SFT: max_steps)")
    parser.add_argument("--pairs", type=int, default=256, help="clean pairs")
    parser.add_argument("--sande-overrides", default=None, help="JSON of SANDEConfig fields (default: the defaults)")
    parser.add_argument("--label", default="defaults")
    parser.add_argument("--worker-timeout", type=int, default=4 * 3600,
                        help="seconds each worker may run (0: no limit); a default run on two busy CPU cores took over 1 h")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=5, metavar=("KIND", "SHAPE", "STEPS", "PAIRS", "OVERRIDES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, shape, steps, pairs, overrides = args.worker
        print(json.dumps(worker(kind, shape, int(steps), int(pairs), overrides if overrides != "-" else "")))
        return
    prepare(args.shape)  # build a random-weight shape once, outside the measured processes
    script = Path(__file__)
    timeout = args.worker_timeout or None
    sft = run_worker(script, ["sft", args.shape, str(args.steps), str(args.pairs), "-"], timeout=timeout)
    print(json.dumps({"sft": sft}), file=sys.stderr, flush=True)  # kept in the log should the SANDE worker fail
    sande = run_worker(script, ["sande", args.shape, str(args.steps), str(args.pairs), args.sande_overrides or "-"],
                       timeout=timeout)
    print_record({"benchmark": "whole_run", "shape": args.shape, "label": args.label, "elimination_steps": args.steps,
                  "clean_pairs": args.pairs, "sande_overrides": args.sande_overrides, "sft": sft, "sande": sande,
                  "run_time_ratio": round(sande["train_seconds"] / sft["train_seconds"], 3),
                  "peak_memory_ratio": round(sande["peak_memory_mb"] / sft["peak_memory_mb"], 3)}, args.out)


if __name__ == "__main__":
    main()
