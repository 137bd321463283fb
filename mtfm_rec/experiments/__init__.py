"""Experiments as commands: each plans normal training jobs, runs what is missing, and reports.

    python -m mtfm_rec.experiments compare --config configs/ml1m_genre.yaml \
        --models mtfm,dcnv2,star --seeds 0,1,2 [--name NAME] [key=value ...]
    python -m mtfm_rec.experiments hta-sweep --config ... [--stacks 3:1x4,3:1x4/nogqa,...]
    python -m mtfm_rec.experiments scaling --config ... [--sizes 16x1x1,...,96x3x4] [--baseline mmoe]
    python -m mtfm_rec.experiments heatmap --run-dir RUN [--layers 0,-1] [--samples N]

See docs/EXPERIMENTS.md. A job is one ``python -m mtfm_rec.train`` run with its own
``train.run_dir`` (so a job runs on GPUs and nodes as any training job does: ``--launcher``), and
an experiment directory can be killed and re-run: finished jobs are kept, an interrupted one
resumes from its checkpoint.
"""
