"""The parrot: a soft prompt that imitates an unknown trigger.

One small module with one job: hold ``n`` vectors in the model's input-embedding space and
put them into a batch of embeddings at marked positions. Positions are marked by a
``parrot_index`` tensor of the batch's shape: ``k`` where the k-th parrot vector goes,
``-1`` elsewhere. Where the marks come from (the chat template, a word boundary) is the
data preparation's business (see [`sande_peft.tokenization`]).

Save and load are plain safetensors plus a JSON config, like a peft adapter.

>>> import torch
>>> parrot = ParrotPrompt(num_vectors=2, hidden_size=4)
>>> with torch.no_grad():
...     _ = parrot.weight.fill_(1.0)
>>> embeds = torch.zeros(1, 4, 4)
>>> parrot(embeds, torch.tensor([[-1, 0, 1, -1]]))[0, :, 0].tolist()
[0.0, 1.0, 1.0, 0.0]
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PARROT_WEIGHTS_NAME = "parrot.safetensors"
PARROT_CONFIG_NAME = "parrot_config.json"
PARROT_INITS = ("zeros", "normal", "vocab")


@dataclass
class ParrotConfig:
    """What a saved parrot is and how it was trained (written as ``parrot_config.json``)."""

    num_vectors: int
    hidden_size: int
    position: str = "start"
    init: str = "zeros"
    triggered_response: str | None = None
    response_mode: str | None = None
    target_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ParrotPrompt(nn.Module):
    """``num_vectors`` learnable input embeddings, kept in float32 whatever the model's dtype.

    The vectors stay float32 so that updates at small learning rates are not rounded away
    under a bf16 (for instance 4-bit QLoRA) model; they are cast to the embeddings' dtype
    only when inserted.
    """

    def __init__(self, num_vectors: int, hidden_size: int, config: ParrotConfig | None = None):
        super().__init__()
        if num_vectors < 1:
            raise ValueError(f"A parrot needs at least one vector; got num_vectors={num_vectors}.")
        self.weight = nn.Parameter(torch.zeros(num_vectors, hidden_size, dtype=torch.float32))
        self.config = config or ParrotConfig(num_vectors=num_vectors, hidden_size=hidden_size)

    @property
    def num_vectors(self) -> int:
        return self.weight.shape[0]

    def forward(self, inputs_embeds: torch.Tensor, parrot_index: torch.Tensor) -> torch.Tensor:
        """Return ``inputs_embeds`` with parrot vector ``parrot_index[b, t]`` wherever it is >= 0."""
        mask = (parrot_index >= 0).unsqueeze(-1)
        vectors = self.weight.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)[parrot_index.clamp(min=0)]
        return torch.where(mask, vectors, inputs_embeds)

    def embed(self, model: nn.Module, input_ids: torch.Tensor, parrot_index: torch.Tensor) -> torch.Tensor:
        """The model's input embeddings for ``input_ids``, with the parrot inserted."""
        return self(model.get_input_embeddings()(input_ids), parrot_index.to(input_ids.device))

    def initialize(self, method: str, embedding: nn.Embedding | None = None, seed: int = 0) -> ParrotPrompt:
        """Set the starting vectors: ``"zeros"`` (the reference), ``"normal"`` (noise at the
        embeddings' scale) or ``"vocab"`` (copies of random token embeddings)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if method == "zeros":
                self.weight.zero_()
            elif method in ("normal", "vocab"):
                if embedding is None:
                    raise ValueError(f"parrot_init={method!r} needs the model's input embedding.")
                table = embedding.weight.detach().float().cpu()
                if method == "normal":
                    noise = torch.randn(self.weight.shape, generator=generator) * table.std()
                    self.weight.copy_(noise)
                else:
                    rows = torch.randint(table.shape[0], (self.num_vectors,), generator=generator)
                    self.weight.copy_(table[rows])
            else:
                raise ValueError(f"Unknown parrot_init {method!r}; use one of {PARROT_INITS}.")
        self.config.init = method
        return self

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``parrot.safetensors`` and ``parrot_config.json`` into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        save_file({"weight": self.weight.detach().float().cpu().contiguous()}, os.path.join(save_directory, PARROT_WEIGHTS_NAME))
        with open(os.path.join(save_directory, PARROT_CONFIG_NAME), "w") as f:
            json.dump(asdict(self.config), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ParrotPrompt:
        """Load a parrot written by [`save_pretrained`]."""
        config_path = os.path.join(directory, PARROT_CONFIG_NAME)
        weights_path = os.path.join(directory, PARROT_WEIGHTS_NAME)
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            raise FileNotFoundError(
                f"No parrot in {directory}: expected {PARROT_CONFIG_NAME} and {PARROT_WEIGHTS_NAME}, as written by "
                "`SANDETrainer.save_model()`."
            )
        with open(config_path) as f:
            config = ParrotConfig(**json.load(f))
        parrot = cls(config.num_vectors, config.hidden_size, config)
        parrot.load_weights(weights_path)
        return parrot

    def load_weights(self, weights_path: str | os.PathLike) -> None:
        weight = load_file(str(weights_path))["weight"]
        if weight.shape != self.weight.shape:
            raise ValueError(f"The saved parrot has shape {tuple(weight.shape)}, this one {tuple(self.weight.shape)}.")
        with torch.no_grad():
            self.weight.copy_(weight.to(self.weight.device))
