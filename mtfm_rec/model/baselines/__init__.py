"""The paper's baselines (section 4.1.2, Table 2) on MTFM's pipeline; built by
:func:`mtfm_rec.model.zoo.build_model` from ``model.name``."""
