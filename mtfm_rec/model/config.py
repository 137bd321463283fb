"""Model configuration: tokenizer sizes, the (K:P) x B attention stack, heads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict


@dataclass
class ModelConfig:
    embedding_dim: int = 16
    d_model: int = 64
    num_blocks: int = 2  # B
    target_layers_per_block: int = 3  # K
    full_layers_per_block: int = 1  # P
    num_heads: int = 4  # H query heads
    num_kv_heads: int = 1  # G key-value heads (GQA); H % G == 0
    attention_backend: str = "auto"  # auto | reference | triton | flex
    num_experts: int = 4
    expert_dim: int = 64
    tower_dim: int = 32
    dropout: float = 0.0
    task_weights: Dict[str, float] = field(default_factory=dict)  # "<scenario>/<task>" -> weight
