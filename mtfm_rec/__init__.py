"""mtfm_rec: multi-scenario recommendation foundation models (MTFM) on TorchRec.

The package is laid out as the data flow:

    data/         raw contract -> user-level aggregation -> Parquet shards -> loader -> Batch
    model/        heterogeneous tokenizer -> Hybrid Target Attention -> MMoE heads -> loss;
                  the paper's baselines (model/baselines/) behind the same interface
    training/     Trainer, sharding (DMP + DDP/FSDP), pipeline, metrics, checkpoints
    kernels/      (installed as mtfm_rec.kernels) each dense op as reference + Triton + dispatcher
    serve/        scenario subgraphs of a trained run, M-Falcon, export, the HTTP service
    experiments/  commands that plan training jobs and report: models x seeds, HTA sweeps
    bench/        `make bench`: the benchmarks behind docs/BENCHMARKS.md
"""

__version__ = "0.1.0"
