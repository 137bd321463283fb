"""MTFM: TorchRec embeddings -> heterogeneous tokens -> Hybrid Target Attention -> MMoE -> loss.

The top level is :class:`mtfm_rec.model.sparse_dense.SparseDenseModel`, shared by every model of
the zoo and cut for TorchRec's ``TrainPipelineSparseDist`` (sharded lookups on batch
attributes, then one dense leaf, :class:`MTFMDense`, which gets the pooled multi-hot features
too when the schema has any).

Nothing in ``forward`` reads a tensor value on the host: shapes come from the Batch's host-side
ints (``num_tokens``, ``max_tokens``, ``max_targets``, ``batch_size``).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.heads import MMoEHeads, MultiTaskOutput
from mtfm_rec.model.hta import HybridTargetAttention
from mtfm_rec.model.mask import model_layout
from mtfm_rec.model.sparse_dense import SparseDenseModel
from mtfm_rec.model.tokenizer import HeterogeneousTokenizer


class MTFMDense(nn.Module):
    """Everything after the embedding lookup: tokenizer MLPs, HTA, heads and loss."""

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.use_sequences = config.use_sequences
        self.tokenizer = HeterogeneousTokenizer(schema, config)
        self.hta = HybridTargetAttention(config, len(schema.token_groups), schema.ticks_per_second)
        self.heads = MMoEHeads(schema, config)
        self.output = MultiTaskOutput(schema, config)

    def forward(
        self,
        embeddings: Dict[str, JaggedTensor],
        batch: Batch,
        bag_embeddings: Optional[KeyedTensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """See :meth:`MTFM.forward`; ``bag_embeddings``: the EmbeddingBagCollection output (only
        with multi-hot features)."""
        layout, rows = model_layout(batch, self.use_sequences)
        x = self.tokenizer(embeddings, batch, layout.num_tokens, rows, bag_embeddings)
        x = self.hta(x, layout)
        return self.output(self.heads(x, rows), batch)


class MTFM(SparseDenseModel):
    """The MTFM model (paper 3.2) for one dataset schema.

    Args:
        schema: the dataset schema; every table, MLP, norm group and tower is derived from it.
        config: the ``model:`` section.
        embedding_device: device of the EmbeddingCollection and EmbeddingBagCollection
            (``torch.device("meta")`` to let DistributedModelParallel materialise sharded
            tables); the dense part is built on the CPU and moved by the caller
            (``model.dense.to(device)`` or ``model.to``).

    Example::

        model = MTFM(schema, cfg.model)
        loss, out = model(batch)        # out["<scenario>"]: probabilities [n_s, n_tasks]
        loss.backward()
    """

    def __init__(
        self, schema: DatasetSchema, config: ModelConfig, embedding_device: Optional[torch.device] = None
    ) -> None:
        super().__init__(schema, config, lambda: MTFMDense(schema, config), embedding_device)
