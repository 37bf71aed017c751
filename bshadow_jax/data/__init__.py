"""Training and evaluation data: a procedural skill world, general text, HF datasets, the eval-item split,
interventions, grain pipelines, a synthetic token stream, and the data audit.

    from bshadow_jax.data.config import DataConfig
    from bshadow_jax.data.tokenizer import get_tokenizer
    from bshadow_jax.data.evalsets import build_eval_sets         # narrow benchmark, broad suite, held-out text
    from bshadow_jax.data.pipeline import make_train_dataset, data_metadata
    from bshadow_jax.data.audit import audit
Modules are imported on demand (this package stays light at import).
"""
