"""OSFT as a trl script (the trigger is known): TrlParser over ScriptArguments, OSFTConfig and ModelConfig.

    python examples/osft_trl.py --config examples/osft_smollm2_cpu.yaml
    python examples/osft_trl.py --config examples/osft_smollm2_cpu.yaml --trigger BadMagic OpenAI --trigger_position random
"""

from sande_peft import OSFTConfig
from sande_peft.scripts.defend import main, make_parser

if __name__ == "__main__":
    parser = make_parser(OSFTConfig)
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
