"""Built-in models and data for the demo, tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "convnet", "mlp", "synthetic_tokens"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 512
    seq_len: int = 64
    width: int = 256
    depth: int = 4
    heads: int = 4


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.ln_1 = nn.LayerNorm(config.width)
        # No bias on q/k/v: a key bias provably gets a zero gradient (softmax is
        # shift-invariant), i.e. pure rounding noise that Adam would amplify.
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.proj = nn.Linear(config.width, config.width)
        self.ln_2 = nn.LayerNorm(config.width)
        self.fc = nn.Linear(config.width, 4 * config.width)
        self.fc_out = nn.Linear(4 * config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, width))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """A GPT-2-style decoder with the output projection tied to the token embedding."""

    def __init__(self, config: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.seq_len, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.ln_f = nn.LayerNorm(config.width)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight
        self.apply(_init_gpt2)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``tokens`` against ``targets``."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _init_gpt2(module: nn.Module) -> None:
    """GPT-2's initialization: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def mlp(width: int = 1024, depth: int = 8) -> nn.Sequential:
    """``depth`` x (Linear(width, width) + ReLU): the fine-tuning regime, parameters dominate."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def convnet(channels: tuple[int, ...] = (32, 64, 128), num_classes: int = 10) -> nn.Sequential:
    """A small image classifier: per stage Conv3x3 + BatchNorm + ReLU, then 2x2 max-pool; global pool + Linear.

    BatchNorm's running statistics are buffers mutated in the forward, which a
    compiled training step must carry along with the parameter updates.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


def synthetic_tokens(
    config: GPTConfig,
    batch_size: int,
    num_batches: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    words: int = 64,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (tokens, next tokens) from a fixed random bigram language.

    The language uses ``words`` of the vocabulary and each word has four likely
    successors, so a model learns it within tens of steps: the loss falls from
    about ln(vocab_size) towards ln(4).
    """
    generator = torch.Generator().manual_seed(seed)
    words = min(words, config.vocab_size)
    successors = torch.randint(words, (words, 4), generator=generator)
    batches = []
    for _ in range(num_batches):
        text = torch.empty(batch_size, config.seq_len + 1, dtype=torch.long)
        text[:, 0] = torch.randint(words, (batch_size,), generator=generator)
        for t in range(config.seq_len):
            choice = torch.randint(4, (batch_size,), generator=generator)
            text[:, t + 1] = successors[text[:, t], choice]
        batches.append((text[:, :-1].to(device), text[:, 1:].to(device)))
    return batches
