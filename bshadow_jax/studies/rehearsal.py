"""`--rehearse`: an accelerator config run as written, at toy size, on this machine, with no network.

    bshadow experiment regimes configs/regimes_gpu.yaml --rehearse --out DIR

The config is read as the real run reads it (with its `key=value` overrides); then every hub resource
it names is replaced by a local stand-in in the same format, and the sizes are cut down:

- a model or tokenizer hub id -> a Hugging Face model folder (config.json, model.safetensors, tokenizer
  files) of a tiny random model of the same architecture family, with a byte-level BPE tokenizer;
- a dataset hub id (`data.hf`, `data.text_hf`) -> a folder laid out as the hub repository
  (data.standins: parquet shards and README `configs`) with the real configs, splits and fields,
  read by the same `datasets.load_dataset` call (streaming too);
- an lm-eval task -> a copy of lm-eval's own task config whose `dataset_path` is that dataset's
  stand-in, in an include folder that takes precedence over the installed tasks;
- steps, batch, sequence length, seeds, documents per task and bootstrap sizes -> toy values.

What is not rehearsed: the download itself (a hub id resolves to a local folder before the same loader
runs). The rehearsed config is written to DIR/rehearsal/config.yaml, the stand-ins under
DIR/rehearsal/, and results.json's "rehearsal" section (and the report's first section) names every
stand-in and every scaled setting.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from bshadow_jax.config import apply_overrides, read_yaml
from bshadow_jax.data.standins import write_standin
from bshadow_jax.errors import UserError
from bshadow_jax.fileio import atomic_write_text
from bshadow_jax.formats.hub import looks_like_hub_id

# toy sizes: (dotted key, value); a key absent from the config is left absent, except those of
# _TOY_ALWAYS, set whenever their section exists (their defaults are full size)
_TOY_ALWAYS = ("evals.lm_eval.limit", "evals.lm_eval.max_gen_toks", "evals.lm_eval.batch_size")
_TOY = [
    ("seeds", lambda v: list(v)[:2]),
    ("finetune.train.steps", 4), ("finetune.train.batch_size", 8), ("finetune.train.seq_len", 64),
    ("finetune.train.log_every", 2), ("finetune.train.checkpoint_every", 2), ("finetune.optim.warmup_steps", 1),
    ("base.pretrain.train.steps", 4), ("base.pretrain.train.batch_size", 8), ("base.pretrain.train.seq_len", 64),
    ("evals.batch_size", 8), ("evals.seq_len", 64),
    ("evals.options.n_narrow_per_skill", 8), ("evals.options.n_other_per_skill", 4),
    ("evals.options.n_bench_other_per_skill", 4), ("evals.options.n_compositional", 4), ("evals.options.n_text", 8),
    ("evals.lm_eval.limit", 8), ("evals.lm_eval.batch_size", 8), ("evals.lm_eval.max_gen_toks", 16),
    ("diagnose.track_points", lambda v: min(int(v), 2)),
    ("analysis.n_boot", 200), ("regime_score.n_boot", 50),
]
_TOY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)
_VOCAB = 512


def _get(node: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(node: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _stand_in_model(hub_id: str, root: Path, tie: bool) -> Path:
    """A tiny random Llama-family model with its tokenizer, as a Hugging Face folder."""
    import jax

    from bshadow_jax import models
    from bshadow_jax.data import tokenizer as T
    from bshadow_jax.data.text import procedural_text

    folder = root / "models" / hub_id.replace("/", "__")
    if (folder / "config.json").is_file():
        return folder
    tok = T.train_bpe(T.training_corpus(tuple(procedural_text(0, 400)), n_items_per_family=40), _VOCAB)
    cfg = models.LlamaConfig(vocab_size=len(tok), tie_word_embeddings=tie, **_TOY_MODEL)
    models.save_pretrained(cfg, models.init_params(cfg, jax.random.key(0)), folder, tokenizer=tok)
    return folder


def _task_configs(names: list[str]) -> dict[str, dict]:
    """lm-eval's own config of each task (its YAML, one `include` level resolved)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    out = {}
    for name in names:
        entry = tm.task_index.get(name)
        if entry is None or entry.cfg is None or "task" not in (entry.cfg or {}):
            raise UserError(f"lm-eval task {name!r}: not one of lm-eval's tasks, so there is nothing to rehearse "
                            "(give it under evals.lm_eval.include_path)")
        cfg = copy.deepcopy(dict(entry.cfg))
        if "include" in cfg:
            parent = read_yaml(Path(entry.yaml_path).parent / cfg.pop("include"))
            cfg = {**parent, **cfg}
        bad = [k for k, v in cfg.items() if callable(v) or (isinstance(v, str) and v.startswith("!function"))]
        if bad:
            raise UserError(f"lm-eval task {name!r}: its config runs Python code ({bad[0]}); the rehearsal copies "
                            "task configs only")
        for key in ("tag", "group"):
            cfg.pop(key, None)
        out[name] = cfg
    return out


def prepare(config_path: str, overrides: list[str] | tuple[str, ...], root: Path) -> tuple[Path, dict]:
    """Write the rehearsed config and its stand-ins under `root`.

    Returns:
        (the rehearsed config's path, results.json's "rehearsal" section).

    Raises:
        UserError / ConfigError: for a hub resource without a stand-in, or an unreadable config.
    """
    import jax

    raw = apply_overrides(read_yaml(config_path), list(overrides))
    cfg = copy.deepcopy(raw)
    root = Path(root).absolute()
    stand_ins: list[dict] = []
    # models and tokenizers: one stand-in folder per hub id (a base and its tokenizer share one)
    models_by_id: dict[str, Path] = {}
    for path, kind in ((["base", "load"], "model"), (["finetune", "data", "tokenizer"], "tokenizer")):
        value = _get(cfg, path)
        if isinstance(value, str) and value and looks_like_hub_id(value):
            if value not in models_by_id:
                models_by_id[value] = _stand_in_model(value, root, tie=True)
            _set(cfg, path, str(models_by_id[value]))
            stand_ins.append({"resource": value, "kind": kind, "stand_in": str(models_by_id[value]),
                              "format": "Hugging Face folder: config.json, model.safetensors, tokenizer files "
                                        f"(a random {_TOY_MODEL['num_hidden_layers']}-layer Llama, BPE {_VOCAB})"})
    # datasets, wherever a data section names one, and those of the lm-eval tasks: one stand-in per hub id
    datasets: dict[str, str] = {}

    def dataset(hub_id: str) -> str:
        if hub_id not in datasets:
            datasets[hub_id] = str(write_standin(hub_id, root / "datasets"))
            stand_ins.append({"resource": hub_id, "kind": "dataset", "stand_in": datasets[hub_id],
                              "format": "hub dataset layout: parquet shards + README configs (same configs, "
                                        "splits and fields; procedural rows)"})
        return datasets[hub_id]

    sections = [_get(cfg, ["finetune", "data"])] + [a.get("data") for a in cfg.get("arms") or [] if isinstance(a, dict)]
    for data in sections:
        for key in ("hf", "text_hf"):
            hf = (data or {}).get(key)
            if isinstance(hf, dict) and looks_like_hub_id(str(hf.get("path", ""))):
                hf["path"] = dataset(str(hf["path"]))
    # lm-eval tasks: copies of lm-eval's configs on the stand-in datasets
    le = _get(cfg, ["evals", "lm_eval"]) or {}
    names = [t for sec in ("narrow", "broad") for t in le.get(sec) or []]
    if names:
        tasks_dir = root / "tasks"
        tasks_dir.mkdir(parents=True, exist_ok=True)
        for name, tcfg in _task_configs(names).items():
            hub_id = str(tcfg.get("dataset_path", ""))
            if looks_like_hub_id(hub_id):
                tcfg["dataset_path"] = dataset(hub_id)
            atomic_write_text(tasks_dir / f"{name}.yaml", yaml.safe_dump(tcfg, sort_keys=False))
            stand_ins.append({"resource": f"lm-eval task {name}", "kind": "lm-eval task",
                              "stand_in": str(tasks_dir / f"{name}.yaml"),
                              "format": f"lm-eval's own task config, dataset_path -> the stand-in of {hub_id}"})
        le["include_path"] = [str(tasks_dir), *(le.get("include_path") or [])]
    # toy sizes
    scaled: dict[str, list] = {}
    for key, value in _TOY:
        path = key.split(".")
        old = _get(cfg, path)
        if old is None and not (key in _TOY_ALWAYS and isinstance(_get(cfg, path[:-1]), dict)):
            continue
        new = value(old) if callable(value) and old is not None else value
        if new != old:
            _set(cfg, path, new)
            scaled[key] = [old, new]
    out = root / "config.yaml"
    header = (f"# Rehearsal of {config_path} (bshadow --rehearse): hub resources replaced by the local stand-ins "
              "below, sizes cut to toy values. Not a study config to edit.\n")
    atomic_write_text(out, header + yaml.safe_dump(cfg, sort_keys=False))
    section = {"config": str(config_path), "rehearsed_config": str(out), "stand_ins": stand_ins, "scaled": scaled,
               "platform": f"{jax.default_backend()} x {jax.device_count()} device(s)",
               "not_rehearsed": "downloads: a hub id resolves to a local folder before the same loader runs"}
    return out, section


def load_study(config_path: str, overrides: list[str] | tuple[str, ...], out_dir: str, *, rehearse: bool = False):
    """The study config to run, and results.json's "rehearsal" section (None unless `rehearse`).

    The config as written is validated first (a typo exits 2 before any stand-in is made); a rehearsal
    then writes its stand-ins under OUT/rehearsal and loads the rehearsed config from there.
    """
    from bshadow_jax.fileio import check_output_dir
    from bshadow_jax.studies.spec import load_study_config

    from bshadow_jax import distributed

    cfg = load_study_config(config_path, list(overrides))
    if not rehearse:
        return cfg, None
    if distributed.is_multiprocess():
        raise UserError("--rehearse runs in one process (it rehearses the config, with every local device in the "
                        "mesh); drop --coordinator/--num-processes/--process-id")
    root = check_output_dir(out_dir).absolute() / "rehearsal"
    path, section = prepare(config_path, overrides, root)
    return load_study_config(path), section
