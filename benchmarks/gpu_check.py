"""The GPU smoke-and-speed check, as one prepared script (run it where a GPU is lent; `--device cpu` to test it).

1. smoke: a random-weight 1B-shape Llama (a tiny one with `--device cpu`), 4-bit NF4 with double
   quantization, SANDE with its defaults for a few steps under gradient checkpointing; killed
   half-way (a checkpoint), resumed with `resume_from_checkpoint=True`; the adapter checked
   frozen in parrot steps and in its dtype after the resume; merged in bf16 onto the dequantized
   base, with the export's logit check;
2. speed: `sande_speed.py` (stage steps against an SFTTrainer step) and `whole_run.py` (a whole
   default run against SFTTrainer for the same elimination steps) on the 1B and 7B shapes.

Writes one JSON file per part under ``--out`` (the device tool's $OUT).

    python benchmarks/gpu_check.py --device cpu --out /tmp/gpu-check      # on the CPU, for checking the script
    # on the GPU machine (see ../shared/device/README.md for the wheels):
    python benchmarks/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def smoke(device: str, out: Path) -> dict:
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, TrainerCallback

    sys.path.insert(0, str(HERE))
    from speed_common import lora, synthetic_pairs, word_tokenizer

    from sande_peft import SANDEConfig, SANDETrainer, merge_and_export
    from sande_peft.schedule import Stage

    gpu = device == "cuda"
    config = LlamaConfig(vocab_size=32000 if gpu else 512, hidden_size=2048 if gpu else 64,
                         intermediate_size=5504 if gpu else 128, num_hidden_layers=24 if gpu else 2,
                         num_attention_heads=16 if gpu else 4, num_key_value_heads=16 if gpu else 4,
                         max_position_embeddings=2048, dtype="bfloat16")
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tokenizer = word_tokenizer(config.vocab_size)
    torch.set_default_dtype(torch.bfloat16)
    try:
        LlamaForCausalLM(config).save_pretrained(folder / "base")
    finally:
        torch.set_default_dtype(torch.float32)
    tokenizer.save_pretrained(folder / "base")
    compute = torch.bfloat16 if gpu else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    data = synthetic_pairs(64, 40, 40, config.vocab_size)

    def trainer():
        args = SANDEConfig(output_dir=str(folder / "run"), triggered_response=" ".join(f"t{i}" for i in range(10, 14)),
                           parrot_max_steps=4, max_steps=4, per_device_train_batch_size=4, parrot_eval_size=8,
                           gradient_checkpointing=True, bf16=gpu, use_cpu=not gpu, save_strategy="steps",
                           save_steps=6, report_to="none", disable_tqdm=True, logging_steps=2,
                           model_init_kwargs={"dtype": compute})
        return SANDETrainer(model=str(folder / "base"), args=args, train_dataset=data, processing_class=tokenizer,
                            quantization_config=quant, peft_config=lora())

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 6

    record: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu"}
    first = trainer()
    dtypes = sorted({str(p.dtype) for n, p in first.model.named_parameters() if "lora_" in n})
    first.add_callback(Stop())
    start = time.time()
    first.train()
    record["first_run_seconds"] = round(time.time() - start, 1)

    resumed = trainer()
    seen = []

    class Watch(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            lora = [p for n, p in resumed.model.named_parameters() if "lora_" in n]
            seen.append({"stage": resumed.plan.stage_at(state.global_step).value,
                         "adapter_grad": any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in lora),
                         "dtypes": sorted({str(p.dtype) for p in lora})})

    resumed.add_callback(Watch())
    resumed.train(resume_from_checkpoint=True)
    record["resume"] = {
        "steps": resumed.state.global_step, "planned": resumed.plan.total_steps,
        "adapter_frozen_in_parrot_steps": all(not s["adapter_grad"] for s in seen if s["stage"] == Stage.SIMULATE.value),
        "adapter_dtype_kept": all(s["dtypes"] == dtypes for s in seen), "dtypes_before": dtypes,
        "parrot_success": resumed.parrot_success,
    }
    start = time.time()
    report = merge_and_export(resumed.model, folder / "merged", tokenizer=tokenizer, dtype=torch.bfloat16)
    record["merge"] = {**report.to_dict(), "seconds": round(time.time() - start, 1)}
    if gpu:
        record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    (out / "smoke.json").write_text(json.dumps(record, indent=2, default=str))
    return record


def speed(shape: str, out: Path, steps: int) -> None:
    for script, extra in (("sande_speed.py", ["--steps", "10", "--skip-paper"]), ("whole_run.py", ["--steps", str(steps)])):
        path = out / f"{script.removesuffix('.py')}-{shape}.jsonl"
        result = subprocess.run([sys.executable, str(HERE / script), "--shape", shape, "--out", str(path), *extra],
                                capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            (out / f"{script}-{shape}.stderr.txt").write_text(result.stderr[-8000:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", nargs="+", default=["smoke", "speed"], choices=["smoke", "speed"])
    parser.add_argument("--shapes", nargs="+", default=None, help="speed shapes (default: 1B and 7B on a GPU, tiny)")
    parser.add_argument("--whole-run-steps", type=int, default=20, help="elimination steps of the whole-run benchmark")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "smoke" in args.parts:
        print(json.dumps(smoke(args.device, out), default=str)[:2000], flush=True)
    if "speed" in args.parts:
        shapes = args.shapes or (["llama1b-4bit", "llama7b-4bit"] if args.device == "cuda" else ["tiny"])
        for shape in shapes:
            speed(shape, out, args.whole_run_steps)


if __name__ == "__main__":
    main()
