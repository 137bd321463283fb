"""mtfm_rec: multi-scenario recommendation foundation models (MTFM) on TorchRec.

The package is laid out as the data flow:

    data/    raw contract -> user-level aggregation -> Parquet shards -> loader -> Batch
    model/   heterogeneous tokenizer -> Hybrid Target Attention -> MMoE heads -> loss
    train/   Trainer, sharding (DMP + DDP/FSDP), pipeline, metrics, checkpoints
    kernels/ (installed as mtfm_rec.kernels) each dense op as reference + Triton + dispatcher
"""

__version__ = "0.1.0"
