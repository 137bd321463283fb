"""``model.name`` -> a model: MTFM or one of the paper's baselines (section 4.1.2, Table 2).

Every model has the same two parts, so the trainer, the sharding planner, the fx-traced input
pipeline, checkpoints and metrics treat them alike::

    model.embedding_collection(batch.sparse_features)   # TorchRec, sharded by DMP
    model.dense(embeddings, batch) -> (loss, {scenario: probs [n_s, n_tasks], ...})

========== ===================================== ================ =============================
name       model                                 trains on        module
========== ===================================== ================ =============================
mtfm       MTFM (this paper)                     all scenarios    mtfm_rec.model.mtfm
dcnv2      DCN-V2 (Wang et al. 2021)             each scenario    baselines.dcnv2
mmoe       MMoE (Ma et al. 2018)                 each scenario    baselines.mmoe
rankmixer  RankMixer (Zhu et al. 2025)           each scenario    baselines.rankmixer
mtgr       MTGR (Han et al. 2025)                each scenario    MTFM with full layers only
onetrans   OneTrans (Zhang et al. 2025)          each scenario    baselines.onetrans
star       STAR (Sheng et al. 2021)              all scenarios    baselines.star
pepnet     PEPNet (Chang et al. 2023)            all scenarios    baselines.pepnet
========== ===================================== ================ =============================

"Each scenario" models run one job per scenario with ``data.scenarios=[<s>]``
(:data:`mtfm_rec.model.config.PER_SCENARIO_MODELS`; ``python -m mtfm_rec.experiments compare``
plans them so).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional

import torch

from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.mtfm import MTFM
from mtfm_rec.model.sparse_dense import SparseDenseModel

# model.name -> "<module under mtfm_rec.model.baselines>:<dense class>"
_BASELINE_DENSE = {
    "dcnv2": "dcnv2:DCNv2Dense",
    "mmoe": "mmoe:MMoEDense",
    "rankmixer": "rankmixer:RankMixerDense",
    "onetrans": "onetrans:OneTransDense",
    "star": "star:STARDense",
    "pepnet": "pepnet:PEPNetDense",
}


def mtgr_config(config: ModelConfig) -> ModelConfig:
    """MTGR (Han et al. 2025, "MTGR: Industrial-Scale Generative Recommendation Framework in
    Meituan") as an MTFM configuration: HSTU over the user's sequence and the candidate tokens
    (whose features, cross features included, stay in the candidate token), with MTGR's dynamic
    mask and Group LayerNorm, but every layer full (no hybrid target layers) and one key-value
    head per query head (no GQA). Same depth: B x (K + P) layers."""
    layers = config.num_blocks * (config.target_layers_per_block + config.full_layers_per_block)
    return dataclasses.replace(
        config,
        num_blocks=1,
        full_layers_per_block=layers,
        target_layers_per_block=0,
        num_kv_heads=config.num_heads,
    )


def build_model(
    schema: DatasetSchema, config: ModelConfig, embedding_device: Optional[torch.device] = None
) -> SparseDenseModel:
    """The unsharded model ``config.name`` names, on the CPU (embeddings on ``embedding_device``)."""
    if config.name == "mtfm":
        return MTFM(schema, config, embedding_device)
    if config.name == "mtgr":
        return MTFM(schema, mtgr_config(config), embedding_device)
    if config.name not in _BASELINE_DENSE:
        raise ValueError(
            f"model.name={config.name!r} unknown; choose one of {['mtfm', 'mtgr', *_BASELINE_DENSE]}"
        )
    module, cls = _BASELINE_DENSE[config.name].split(":")
    dense_class = getattr(importlib.import_module(f"mtfm_rec.model.baselines.{module}"), cls)
    return SparseDenseModel(schema, config, lambda: dense_class(schema, config), embedding_device)
