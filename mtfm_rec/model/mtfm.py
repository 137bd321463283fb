"""MTFM: TorchRec embeddings -> heterogeneous tokens -> Hybrid Target Attention -> MMoE -> loss.

The top level is cut for TorchRec's ``TrainPipelineSparseDist``, which fx-traces
``MTFM.forward`` and treats every child without a sharded submodule as a leaf::

    MTFM.forward(batch)
      embeddings = self.embedding_collection(batch.sparse_features)   # sharded by DMP
      return self.dense(embeddings, batch)                              # one leaf: all dense work

Nothing in ``forward`` reads a tensor value on the host: shapes come from the Batch's host-side
ints (``num_tokens``, ``max_tokens``, ``max_targets``, ``batch_size``).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.heads import MMoEHeads, funnel_log_probs, multi_task_loss, task_weight_vectors
from mtfm_rec.model.hta import HybridTargetAttention
from mtfm_rec.model.mask import build_layout, build_target_only_layout
from mtfm_rec.model.tokenizer import HeterogeneousTokenizer, make_embedding_collection


class MTFMDense(nn.Module):
    """Everything after the embedding lookup: tokenizer MLPs, HTA, heads and loss."""

    def __init__(self, schema: DatasetSchema, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.use_sequences = config.use_sequences
        self.task_names = {s.name: list(s.tasks) for s in schema.scenarios}
        self.tokenizer = HeterogeneousTokenizer(schema, config)
        self.hta = HybridTargetAttention(config, num_groups=len(schema.token_groups))
        self.heads = MMoEHeads(schema, config)
        for i, vec in enumerate(task_weight_vectors(schema, config.task_weights).values()):
            self.register_buffer(f"task_weight_{i}", vec, persistent=False)

    def task_weights(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, f"task_weight_{i}") for i, name in enumerate(self.task_names)}

    def forward(
        self, embeddings: Dict[str, JaggedTensor], batch: Batch
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """See :meth:`MTFM.forward`."""
        if self.use_sequences:
            layout = build_layout(batch)
            rows = batch.target_positions
        else:
            # Feature-only baseline: token i is the batch's T token target_rows[i].
            layout = build_target_only_layout(batch)
            t = layout.num_tokens
            inverse = torch.zeros(batch.num_tokens, dtype=torch.int64, device=batch.target_rows.device)
            inverse = inverse.index_copy(0, batch.target_rows, torch.arange(t, device=inverse.device))
            rows = {name: inverse[pos] for name, pos in batch.target_positions.items()}
        x = self.tokenizer(embeddings, batch, layout.num_tokens, rows)
        x = self.hta(x, layout)
        raw = self.heads(x, rows)
        log_p: Dict[str, torch.Tensor] = {}
        log_q: Dict[str, torch.Tensor] = {}
        for name, z in raw.items():
            log_p[name], log_q[name] = funnel_log_probs(z.float(), self.config.conditional_towers)
        loss, parts = multi_task_loss(
            log_p,
            log_q,
            batch.labels,
            batch.label_mask,
            self.task_names,
            self.task_weights(),
            self.config.loss_average,
        )
        out: Dict[str, torch.Tensor] = {}
        for name in raw:
            out[name] = log_p[name].exp()
            out[f"{name}/logits"] = log_p[name] - log_q[name]
        for key, value in parts.items():
            out[f"loss/{key}"] = value.detach()
        return loss, out


class MTFM(nn.Module):
    """The MTFM model (paper 3.2) for one dataset schema.

    Args:
        schema: the dataset schema; every table, MLP, norm group and tower is derived from it.
        config: the ``model:`` section.
        embedding_device: device of the EmbeddingCollection (``torch.device("meta")`` to let
            DistributedModelParallel materialise sharded tables); the dense part is built on
            the CPU and moved by the caller (``model.dense.to(device)`` or ``model.to``).

    Example::

        model = MTFM(schema, cfg.model)
        loss, out = model(batch)        # out["<scenario>"]: probabilities [n_s, n_tasks]
        loss.backward()
    """

    def __init__(
        self, schema: DatasetSchema, config: ModelConfig, embedding_device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        self.schema = schema
        self.config = config
        self.embedding_collection = make_embedding_collection(schema, config, embedding_device)
        self.dense = MTFMDense(schema, config)

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
        return self.dense(embeddings, batch)
