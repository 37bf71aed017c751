"""Training data: a procedural skill world, general text, HF datasets, interventions, grain pipelines.

    from bshadow_jax.data.config import DataConfig
    from bshadow_jax.data.tokenizer import get_tokenizer
    from bshadow_jax.data.pipeline import make_train_dataset, data_metadata
    from bshadow_jax.data.audit import audit
Modules are imported on demand (this package stays light at import).
"""
