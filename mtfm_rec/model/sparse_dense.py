"""The top level every model of the zoo shares: sharded lookups, then one dense leaf.

TorchRec's ``TrainPipelineSparseDist`` fx-traces this ``forward`` and treats every child without a
sharded submodule as a leaf, so it calls the sharded modules directly on batch attributes::

    embeddings = self.embedding_collection(batch.sparse_features)        # sharded by DMP
    pooled = self.embedding_bag_collection(batch.bag_features)           # only with multi-hot features
    return self.dense(embeddings, batch[, pooled])                       # one leaf: all dense work

Whether the bag collection exists is decided once, from the schema, at construction: a schema
without multi-hot features builds and traces the model it always did. Nothing here reads a
tensor value on the host.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.tokenizer import make_embedding_bag_collection, make_embedding_collection


class SparseDenseModel(nn.Module):
    """A model's embedding lookups (TorchRec ``EmbeddingCollection``, and an
    ``EmbeddingBagCollection`` for multi-hot features) and its dense part.

    Args:
        schema: the dataset schema (every table comes from it).
        config: the ``model:`` section.
        make_dense: builds the dense part, ``(embeddings, batch, bag_embeddings=None) -> (loss,
            out)`` (e.g. :class:`mtfm_rec.model.mtfm.MTFMDense`); called after the lookups are
            built, so a seed gives every model the same tables whatever its dense part.
        embedding_device: device of the lookups (``torch.device("meta")`` to let
            DistributedModelParallel materialise sharded tables); the dense part is built on
            the CPU and moved by the caller (``model.dense.to(device)`` or ``model.to``).
    """

    def __init__(
        self,
        schema: DatasetSchema,
        config: ModelConfig,
        make_dense: Callable[[], nn.Module],
        embedding_device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.schema = schema
        self.config = config
        self.embedding_collection = make_embedding_collection(schema, config, embedding_device)
        # None without multi-hot features: forward then never touches batch.bag_features
        self.embedding_bag_collection = make_embedding_bag_collection(schema, config, embedding_device)
        self.dense = make_dense()

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss and predictions of a batch.

        Returns:
            ``(loss, out)``: ``loss`` a scalar (module ``heads`` documents the averaging);
            ``out["<scenario>"]``: ``[n_s, num_tasks]`` exposure-level probabilities (tasks in
            schema order, exposures in the KJT order of ``batch.labels[scenario]``);
            ``out["<scenario>/logits"]``: their logits; ``out["loss/<scenario>/<task>"]``: the
            detached mean BCE of that task in the batch (0 if it had no label).
        """
        embeddings = self.embedding_collection(batch.sparse_features)
        if self.embedding_bag_collection is None:
            return self.dense(embeddings, batch)
        return self.dense(embeddings, batch, self.embedding_bag_collection(batch.bag_features))
