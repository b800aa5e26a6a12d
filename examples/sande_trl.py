"""SANDE as a trl script: TrlParser over ScriptArguments, SANDEConfig and ModelConfig.

    python examples/sande_trl.py --config examples/sande_smollm2_cpu.yaml
    python examples/sande_trl.py --config examples/sande_qlora_7b.yaml          # one GPU, 4-bit QLoRA
    python examples/sande_trl.py --config examples/sande_smollm2_cpu.yaml --parrot_length 8 --max_steps 40
    accelerate launch --num_processes 2 examples/sande_trl.py --config examples/sande_qlora_7b.yaml

Every field of SANDEConfig (and of trl's SFTConfig, ModelConfig and ScriptArguments) can be set
in the YAML recipe or on the command line; the command line wins. `dataset_name` may be a local
.json/.jsonl file (prompt/completion, messages, or Alpaca records) or a hub dataset.

What it does, top to bottom (see `sande_peft/scripts/defend.py`):
1. loads the suspect model (4-bit when `load_in_4bit: true`) and the clean data;
2. builds a `SANDETrainer` with a LoRA adapter (`use_peft: true`);
3. trains: stage 1 learns the parrot, stage 2 eliminates it;
4. saves the adapter and `parrot.safetensors` to `output_dir`;
5. with `merged_output_dir`, merges the adapter and writes a verified full model there.
"""

from sande_peft import SANDEConfig
from sande_peft.scripts.defend import main, make_parser

if __name__ == "__main__":
    parser = make_parser(SANDEConfig)
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
