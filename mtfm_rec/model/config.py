"""Model configuration: tokenizer sizes, the (K:P) x B attention stack, heads.

See docs/MODEL.md for what each key changes in the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

# model.attention_backend: a value of AttentionBackend (every implementation lives in
# mtfm_rec.kernels.hstu_attention); "auto" is resolved from the device by its resolve() (the
# Triton kernels on CUDA, the fused C++ kernel on the CPU), so one config serves both.
# kernels.backends imports no torch: loading a config must not pull it in.
from mtfm_rec.kernels.backends import AttentionBackend, values

_ATTENTION_BACKENDS = values(AttentionBackend)

LOSS_AVERAGES = ("exposure", "task")  # model.loss_average; see mtfm_rec.model.heads
TIME_BIAS_SOURCES = ("query", "group")  # model.time_bias_source; see mtfm_rec.model.time_features
# model.attention_normalisation; see mtfm_rec.model.segment_norm
ATTENTION_NORMALISATIONS = ("visible", "segment")

# model.name: MTFM or one of the paper's baselines (section 4.1.2, Table 2), all built by
# mtfm_rec.model.zoo.build_model from the same schema and trained by the same Trainer.
MODEL_NAMES = ("mtfm", "dcnv2", "mmoe", "rankmixer", "mtgr", "onetrans", "star", "pepnet")
# As in the paper, these train one model per scenario (data.scenarios=[<s>]); the others train
# on all scenarios at once. mtfm_rec.experiments reads this to plan its jobs.
PER_SCENARIO_MODELS = ("dcnv2", "mmoe", "rankmixer", "mtgr", "onetrans")
CROSS_STRUCTURES = ("stacked", "parallel")


@dataclass
class BaselineConfig:
    """Hyperparameters of the baselines (``model.baseline.*``); the shared sizes (embedding_dim,
    d_model, num_experts, expert_dim, tower_dim, num_heads, dropout) come from ``model.*``."""

    hidden: List[int] = field(default_factory=lambda: [256, 128])  # MLP widths (deep parts, FCNs)
    cross_layers: int = 3  # DCNv2: cross layers
    cross_structure: str = "stacked"  # DCNv2: stacked (cross -> deep) | parallel (cross || deep)
    cross_rank: int = 0  # DCNv2: 0 = full-rank W; r > 0 = low-rank W = U V^T (mixture-free)
    mixer_tokens: int = 4  # RankMixer: tokens T (= heads of the token mixing)
    mixer_layers: int = 2  # RankMixer: layers
    onetrans_layers: int = 4  # OneTrans: transformer layers
    # OneTrans pyramid: the sequence tokens that still issue queries shrink geometrically from
    # all of them at the first layer to this fraction at the last (T tokens always do)
    pyramid_final_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.cross_structure not in CROSS_STRUCTURES:
            raise ValueError(
                f"baseline.cross_structure={self.cross_structure!r} unknown; choose one of {CROSS_STRUCTURES}"
            )
        for key in ("cross_layers", "mixer_tokens", "mixer_layers", "onetrans_layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"baseline.{key} must be >= 1, got {getattr(self, key)}")
        if self.cross_rank < 0:
            raise ValueError(f"baseline.cross_rank must be >= 0, got {self.cross_rank}")
        if not 0.0 < self.pyramid_final_fraction <= 1.0:
            raise ValueError(
                f"baseline.pyramid_final_fraction must be in (0, 1], got {self.pyramid_final_fraction}"
            )


@dataclass
class ModelConfig:
    name: str = "mtfm"  # one of MODEL_NAMES
    embedding_dim: int = 16  # every EmbeddingCollection table (TorchRec needs one dim per EC)
    d_model: int = 64
    tokenizer_hidden: List[int] = field(default_factory=list)  # hidden sizes of the eq. 3/4 MLPs
    num_blocks: int = 2  # B
    target_layers_per_block: int = 3  # K
    full_layers_per_block: int = 1  # P
    num_heads: int = 4  # H query heads
    num_kv_heads: int = 1  # G key-value heads (GQA); H % G == 0
    head_dim: int = 0  # per-head dim of Q/K/V/U; 0 -> d_model // num_heads
    attention_backend: str = (
        "auto"  # auto (Triton on CUDA, cpp on CPU) | reference | prefix | blocksparse | cpp | triton
    )
    # Sinusoids of each token's own time at this many periods, geometric from 1 minute to 30 days,
    # projected to d_model and added to X(0) (TimeEncoding, tokenizer.py); 0 = off. A dot product
    # of two tokens' encodings depends on how far apart in time they are. (Not relative to the
    # sample's latest token: that reference leaked labels, docs/TRAINING.md finding 8.)
    time_frequencies: int = 0
    # Pairs of q/k dims per head rotated by each token's own time, periods 1 minute to 2 days
    # (TimeRotary, time_features.py): q . k then depends on the query-key time gap; 0 = off.
    time_rotary_pairs: int = 0
    # The share of the kv heads (and their query heads) the rotary turns; the rest stay content-only.
    time_rotary_head_share: float = 1.0
    # Pairs of channels appended to every head's q and k whose share of q . k is a learned
    # function of the query-key time gap (TimeBias, time_features.py); 0 = off.
    time_bias_pairs: int = 0
    # Where the time bias's coefficients come from: "query" projects them from each query's input;
    # "group" learns one set per token group (scenario's T tokens, each sequence), so a scenario's
    # recency profile is trained by its own loss only.
    time_bias_source: str = "query"
    attention_normalisation: str = "visible"  # one of ATTENTION_NORMALISATIONS
    attention_alpha: float = 0.0  # scale inside SiLU(alpha * q.k); 0 -> head_dim ** -0.5
    num_experts: int = 4
    expert_dim: int = 64
    tower_dim: int = 32
    dropout: float = 0.0
    task_weights: Dict[str, float] = field(default_factory=dict)  # "<scenario>/<task>" -> weight
    # exposure: mean BCE over every labelled (exposure, task) | task: mean of per-task means (heads.py)
    loss_average: str = "exposure"
    use_sequences: bool = True  # False: feature-only baseline (T tokens alone, no H/R)
    conditional_towers: bool = True  # funnel: tower k predicts p(task k | task k-1), see heads.py
    norm_eps: float = 1e-5
    baseline: BaselineConfig = field(default_factory=BaselineConfig)

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model.name={self.name!r} unknown; choose one of {MODEL_NAMES}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend={self.attention_backend!r} unknown; choose one of {_ATTENTION_BACKENDS}"
            )
        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average={self.loss_average!r} unknown; choose one of {LOSS_AVERAGES}")
        if self.time_bias_source not in TIME_BIAS_SOURCES:
            raise ValueError(
                f"model.time_bias_source={self.time_bias_source!r} unknown; choose one of {TIME_BIAS_SOURCES}"
            )
        if self.attention_normalisation not in ATTENTION_NORMALISATIONS:
            raise ValueError(
                f"model.attention_normalisation={self.attention_normalisation!r} unknown; "
                f"choose one of {ATTENTION_NORMALISATIONS}"
            )
        if self.num_heads < 1 or self.num_kv_heads < 1:
            raise ValueError(f"num_heads={self.num_heads} and num_kv_heads={self.num_kv_heads} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads} "
                "(GQA: each key-value head serves num_heads // num_kv_heads query heads)"
            )
        if self.num_blocks < 1 or self.target_layers_per_block < 0 or self.full_layers_per_block < 0:
            raise ValueError("num_blocks must be >= 1 and layers per block >= 0")
        if self.target_layers_per_block + self.full_layers_per_block < 1:
            raise ValueError("a block needs at least one layer (K + P >= 1)")
        if self.head_dim == 0 and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def layer_kinds(self) -> List[str]:
        """``"full"`` / ``"target"`` per layer, bottom-up: each block is P full then K target."""
        block = ["full"] * self.full_layers_per_block + ["target"] * self.target_layers_per_block
        return block * self.num_blocks
