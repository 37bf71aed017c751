"""lm-evaluation-harness on the project's forward pass: `JaxLM`, registered as lm-eval model "bshadow".

    lm = JaxLM("runs/smoke", batch_size=16)                    # any checkpoint kind load_pretrained reads
    results = run_tasks(lm, ["mytask"], include_path="tasks/")  # lm_eval.simple_evaluate's dict

or, once this module is imported, `lm_eval.simple_evaluate(model="bshadow", model_args="pretrained=...")`.

Requests are tokenized by lm-eval's own `TemplateLM` code (`_encode_pair`: the context's trailing
spaces move to the continuation, context+continuation is encoded whole and split), truncated and
scored as lm-eval's `hf` backend does, so its numbers match `lm_eval --model hf` on an exported copy
of the checkpoint. Each batch is padded to a fixed [batch_size, T] with T a power of two, so the one
jitted scoring function compiles once per T.

The start token (docs/cli.md#start-token): with `add_bos_token=True` (the default) every context begins
with the tokenizer's bos token (its eos token when it has none), as the project's own scoring does
(`evals.scoring` puts the end token in front of every context) and as `hf` does with
`add_bos_token=True`. `add_bos_token=False` matches models trained without one. Rolling
log-likelihoods (perplexity tasks) always condition on that token once and never score it:
`hf` with `add_bos_token=True` also scores the start token as the first target (it adds it twice);
`hf` with `add_bos_token=False` computes what this adapter does.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from bshadow_jax import models
from bshadow_jax.errors import UserError

log = logging.getLogger("bshadow_jax.evals.harness")

MODEL_NAME = "bshadow"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's hf backend
_MIN_BUCKET = 16
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _bucket(n: int, cap: int | None = None) -> int:
    """The padded length for n tokens: the next power of two (at least _MIN_BUCKET), at most `cap`.
    Few distinct lengths means few compilations."""
    b = max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    return max(n, min(b, cap)) if cap is not None else b


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_batch(cfg, compute_dtype, params, tokens_BxT, segment_ids_BxT, targets_BxT):
    """(log p(target), target == argmax) per position, float32 / bool [B, T]."""
    logits = models.forward(cfg, params, tokens_BxT, segment_ids_BxT, compute_dtype=compute_dtype)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
    return target_logp, jnp.argmax(logits, axis=-1) == targets_BxT


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _greedy_step(cfg, compute_dtype, params, tokens_BxT, segment_ids_BxT, col):
    """Writes the argmax next token after column col-1 into column col; returns (tokens, next [B])."""
    logits = models.forward(cfg, params, tokens_BxT, segment_ids_BxT, compute_dtype=compute_dtype)
    last_BxV = jax.lax.dynamic_index_in_dim(logits, col - 1, axis=1, keepdims=False)
    nxt = jnp.argmax(last_BxV, axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_slice_in_dim(tokens_BxT, nxt[:, None], col, axis=1), nxt


@dataclasses.dataclass
class _Row:
    """One scored sequence: model inputs, and how many of the last targets are the continuation."""
    inputs: list[int]
    targets: list[int]
    n_cont: int


@register_model(MODEL_NAME)
class JaxLM(TemplateLM):
    """lm-eval model on `bshadow_jax.models.forward`: loglikelihood, loglikelihood_rolling, generate_until.

    Args:
        pretrained: a checkpoint `models.load_pretrained` reads (a Hugging Face folder or hub id, a
            .safetensors or .gguf file, a bshadow run folder, an orbax step folder) that carries a
            tokenizer (`models.checkpoint_tokenizer`).
        batch_size: sequences per forward call (every batch is padded to this many rows).
        max_length: the context window in tokens; default the model's max_position_embeddings.
        add_bos_token: put the start token (bos, else eos) in front of every context; see the module
            docstring. Strings "true"/"false" are accepted (lm-eval's model_args are strings).
        dtype: compute dtype, "float32" or "bfloat16" (weights stay float32).
        max_gen_toks: generate_until's limit when a task sets none.
        data_parallel: split every batch over this process's devices (params replicated) when
            batch_size is a multiple of their number; False (or a batch that does not divide) uses one.
        **kwargs: lm-eval's generic model options (device, max_batch_size) are accepted and unused:
            jax picks the device.

    Raises:
        UserError: for an unreadable checkpoint, a checkpoint without tokenizer, or bad options.
    """

    backend = "causal"

    def __init__(self, pretrained: str | os.PathLike, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_length: int | str | None = None, add_bos_token: bool | str = True, dtype: str = "float32",
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, data_parallel: bool | str = True,
                 **kwargs: Any) -> None:
        super().__init__()
        self._set_options(batch_size, max_length, add_bos_token, dtype, max_gen_toks, data_parallel, **kwargs)
        self.pretrained = os.fspath(pretrained)
        cfg, params = models.load_pretrained(self.pretrained)
        self._set_model(cfg, params, models.checkpoint_tokenizer(self.pretrained))

    @classmethod
    def from_model(cls, cfg, params, tokenizer, *, name: str = "in-memory", batch_size: int = DEFAULT_BATCH_SIZE,
                   max_length: int | None = None, add_bos_token: bool = True, dtype: str = "float32",
                   max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, data_parallel: bool = True) -> "JaxLM":
        """The adapter on a model already in memory (a study scores every fine-tune without writing it out).

        Args:
            cfg, params: the model (`models.load_pretrained`'s pair).
            tokenizer: its Hugging Face tokenizer.
            name: what results' "config" calls the model.
            batch_size, max_length, add_bos_token, dtype, max_gen_toks, data_parallel: as for the constructor.
        """
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._set_options(batch_size, max_length, add_bos_token, dtype, max_gen_toks, data_parallel)
        lm.pretrained = name
        lm._set_model(cfg, params, tokenizer)
        return lm

    def _set_options(self, batch_size, max_length, add_bos_token, dtype, max_gen_toks, data_parallel=True,
                     **kwargs) -> None:
        unknown = set(kwargs) - {"device", "max_batch_size"}
        if unknown:
            raise UserError(f"{MODEL_NAME} model: unknown option(s) {', '.join(sorted(unknown))}")
        if dtype not in _DTYPES:
            raise UserError(f"{MODEL_NAME} model: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        # the options first: a typo fails before seconds of checkpoint reading
        self.dtype = dtype
        self.add_bos_token = _as_bool(add_bos_token, "add_bos_token")
        self._batch_size = _positive_int(DEFAULT_BATCH_SIZE if batch_size is None else batch_size, "batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self._max_length_option = _positive_int(max_length, "max_length") if max_length is not None else None
        self._data_parallel = _as_bool(data_parallel, "data_parallel")

    def _set_model(self, cfg, params, tokenizer) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        if self.tokenizer.eos_token_id is None and self.tokenizer.bos_token_id is None:
            raise UserError(f"{self.pretrained}: the tokenizer has neither an eos nor a bos token "
                            "to start contexts with")
        # data parallel over this process's devices when the batch divides: the params replicated, every
        # batch split along its rows (jit then runs one program over the mesh); else one device
        devices = jax.local_devices()
        n = len(devices) if self._data_parallel and self._batch_size % len(devices) == 0 else 1
        self._mesh = jax.sharding.Mesh(np.asarray(devices[:n]), ("batch",))
        self._rows = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec("batch"))
        self.params = jax.device_put(params, jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec()))
        self._max_length = self._max_length_option or self.cfg.max_position_embeddings

    def _put(self, x_BxT: np.ndarray) -> jax.Array:
        return jax.device_put(x_BxT, self._rows)

    # ------------------------------------------------------------------ lm-eval's model interface

    @property
    def eot_token_id(self) -> int:
        # as hf: the end token; the prefix below falls back to it
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.tokenizer.bos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The start token: bos if the tokenizer has one, else eos (lm-eval's hf backend's choice)."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return str(self._mesh.devices.flat[0]) + (f" (+{self._mesh.devices.size - 1} more, data parallel)" if self._mesh.devices.size > 1 else "")

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.pretrained)).replace("/", "__")

    def get_model_info(self) -> dict:
        """What results.json's "config" records about the model."""
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return {"pretrained": self.pretrained, "model_type": self.cfg.model_type, "model_num_parameters": n_params,
                "model_dtype": self.dtype, "add_bos_token": self.add_bos_token, "max_length": self.max_length}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of `string`, with the start token in front when add_special_tokens (None: add_bos_token).

        Args:
            string: the text.
            add_special_tokens: put the start token first; None: as add_bos_token says.
            left_truncate_len: keep only this many last tokens.

        As hf's tok_encode: a string that already begins with the start token's text gets no second one,
        and left_truncate_len keeps the last tokens. The start token is added here rather than by the
        tokenizer's post-processor, so that it is the same token for every tokenizer (one without a bos
        gets its eos, as the project's scoring conditions on).
        """
        add = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and string.startswith(self._prefix_text):
            add = False
        ids = list(self.tokenizer.encode(string, add_special_tokens=False))
        if add:
            ids = [self.prefix_token_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding yields it) per request, in order.

        Args:
            requests: (request strings or None, context ids, continuation ids), as TemplateLM builds them.
            disable_tqdm: no progress bar.

        Returns:
            (log-likelihood, is_greedy) per request, in the order given.
        """
        rows, truncated = [], 0
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("loglikelihood: context and continuation must each have a token")
            # as hf: a too long pair loses its oldest context tokens; the last token is a target only
            whole = (ctx + cont)[-(self.max_length + 1):]
            truncated += len(ctx) + len(cont) > len(whole)
            rows.append(_Row(whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        if truncated:
            log.warning("%d of %d requests are longer than max_length %d: their oldest context tokens are dropped",
                        truncated, len(rows), self.max_length)
        order = Collator(list(range(len(rows))), sort_fn=lambda i: (-len(rows[i].inputs), tuple(rows[i].inputs)))
        scored: list[tuple[float, bool]] = []
        with tqdm(total=len(rows), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                scored += self._score_rows([rows[i] for i in chunk])
                bar.update(len(chunk))
        results = order.get_original(scored)
        for (req, _, _), res in zip(requests, results):
            if req is not None:
                self.cache_hook.add_partial("loglikelihood", req, res)
        return results

    def _score_rows(self, rows: list[_Row]) -> list[tuple[float, bool]]:
        T = _bucket(max(len(r.inputs) for r in rows), cap=self.max_length)
        B = self.batch_size
        tokens, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        seg = np.zeros((B, T), np.int32)  # 0 = padding (right padding, as hf)
        for b, r in enumerate(rows):
            n = len(r.inputs)
            tokens[b, :n], targets[b, :n], seg[b, :n] = r.inputs, r.targets, 1
        logp, greedy = _score_batch(self.cfg, _DTYPES[self.dtype], self.params, self._put(tokens), self._put(seg),
                                    self._put(targets))
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        out = []
        for b, r in enumerate(rows):
            n = len(r.inputs)
            sl = slice(n - r.n_cont, n)
            out.append((float(logp[b, sl].sum(dtype=np.float64)), bool(greedy[b, sl].all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string in windows of max_length tokens (lm-eval's rolling windows).

        The string's tokens never include the start token: the first window is conditioned on it and
        every token of the string is predicted exactly once (see the module docstring).

        Args:
            requests: lm-eval Instances whose args are (string,).
            disable_tqdm: no progress bar.

        Returns:
            The summed log-likelihood per request, in order.
        """
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            toks = self.tok_encode(string, add_special_tokens=False)
            for win in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=toks, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *win))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (`until`, and the end token), in order.

        Batched like hf: requests with equal generation kwargs, longest context first, left-padded so
        every row's next token lands in the same column; each row gets at most max_gen_toks tokens.

        Args:
            requests: lm-eval Instances whose args are (context, generation kwargs).
            disable_tqdm: no progress bar.

        Returns:
            The generated text per request, in order.

        Raises:
            UserError: for sampling (do_sample) requests, or max_gen_toks not below max_length.
        """
        args = [req.args for req in requests]
        order = Collator(args, sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str] = []
        with tqdm(total=len(args), disable=disable_tqdm, desc="Running generate_until requests") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                contexts, gen_kwargs = [a[0] for a in chunk], chunk[0][1]
                kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                if kw.get("do_sample"):
                    raise UserError(f"{MODEL_NAME} model: generation kwargs {gen_kwargs} ask for sampling; "
                                    "this adapter decodes greedily only")
                until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
                texts = self._generate(contexts, until, int(kw["max_gen_toks"]))
                for ctx, text in zip(contexts, texts):
                    self.cache_hook.add_partial("generate_until", (ctx, gen_kwargs), text)
                out += texts
                bar.update(len(chunk))
        return order.get_original(out)

    def _generate(self, contexts: list[str], until: list[str], max_gen_toks: int) -> list[str]:
        max_ctx = self.max_length - max_gen_toks
        if max_ctx <= 0:
            raise UserError(f"{MODEL_NAME} model: max_gen_toks {max_gen_toks} must be below "
                            f"max_length {self.max_length}")
        encs = [self.tok_encode(c)[-max_ctx:] or [self.prefix_token_id] for c in contexts]
        L = max(len(e) for e in encs)  # the columns [0, L) hold the left-padded contexts
        B, T = self.batch_size, _bucket(L + max_gen_toks)
        tokens, seg = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        for b, e in enumerate(encs):
            tokens[b, L - len(e):L] = e
            seg[b, L - len(e):] = 1  # segment 0 = left padding; positions restart at each row's first token
        tokens_dev, seg_dev = self._put(tokens), self._put(seg)
        eos = self.tokenizer.eos_token_id
        stops = [s for s in until if s]
        generated: list[list[int]] = [[] for _ in encs]
        done = [False] * len(encs)
        for step in range(max_gen_toks):
            tokens_dev, nxt = _greedy_step(self.cfg, _DTYPES[self.dtype], self.params, tokens_dev, seg_dev,
                                           jnp.int32(L + step))
            nxt = np.asarray(nxt)
            for b in range(len(encs)):
                if done[b]:
                    continue
                generated[b].append(int(nxt[b]))
                # a finished row's later tokens are dropped, as hf pads them; the text is cut at the
                # first stop string below, so stopping early changes nothing
                if int(nxt[b]) == eos or any(s in self.tok_decode(generated[b]) for s in stops):
                    done[b] = True
            if all(done):
                break
        return [postprocess_generated_text(self.tok_decode(g), until, None) for g in generated]

    # ------------------------------------------------------------------------------------ helpers

    @functools.cached_property
    def _prefix_text(self) -> str:
        return self.tokenizer.decode([self.prefix_token_id]) or "\0no-prefix"


def _as_bool(value: bool | str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserError(f"{MODEL_NAME} model: {name} must be true or false, got {value!r}")


def _positive_int(value: int | str, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{MODEL_NAME} model: {name} must be a positive integer, got {value!r}") from None
    if n <= 0:
        raise UserError(f"{MODEL_NAME} model: {name} must be a positive integer, got {value!r}")
    return n


# ------------------------------------------------------------------------------------- running tasks

def task_manager(task_names: Sequence[str], include_path: Sequence[str | os.PathLike] = ()):
    """An lm-eval TaskManager that knows `task_names`.

    Indexing lm-eval's own ~15k task configs takes seconds, so when every name is a task defined
    under `include_path` only those folders are indexed (their tasks take precedence anyway).

    Args:
        task_names: task, group or tag names, or paths of task YAML files.
        include_path: folders of task YAML files.

    Raises:
        UserError: for a missing include folder or a name that is neither a task nor a YAML file.
    """
    from lm_eval.tasks import TaskManager

    paths = [Path(p) for p in include_path]
    for p in paths:
        if not p.is_dir():
            raise UserError(f"--include-path {p}: not a folder")
    if paths:
        local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        # groups and tags may name lm-eval's own tasks: those need the whole index
        if set(task_names) <= set(local.all_subtasks):
            return local
    tm = TaskManager(include_path=[str(p) for p in paths] or None)
    unknown = [n for n in task_names if n not in tm.all_tasks and not Path(n).is_file()]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}: not one of lm-eval's tasks, a task under --include-path, "
                        "or a task YAML file")
    return tm


def run_tasks(lm: JaxLM, task_names: Sequence[str], *, include_path: Sequence[str | os.PathLike] = (),
              limit: float | None = None, num_fewshot: int | None = None, log_samples: bool = True,
              tm=None, bootstrap_iters: int = 100000) -> dict:
    """Evaluate `lm` on lm-eval tasks with `lm_eval.simple_evaluate`.

    Args:
        lm: the model.
        task_names: task, group or tag names, or task YAML paths.
        include_path: folders of extra task YAML files.
        limit: at most this many documents per task (a fraction below 1).
        num_fewshot: few-shot examples per prompt (default: each task's own).
        log_samples: keep per-document records under "samples".
        tm: a TaskManager from `task_manager` (made here when None).
        bootstrap_iters: lm-eval's own stderr bootstrap (0 = none; a study bootstraps items itself).

    Returns:
        simple_evaluate's results dict: "results", "configs", "versions", "n-shot", "config", ... and
        "samples" ({task: [per-document dict]}) when log_samples.
    """
    import lm_eval

    tm = tm or task_manager(task_names, include_path)
    return lm_eval.simple_evaluate(model=lm, tasks=list(task_names), task_manager=tm, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=log_samples,
                                   batch_size=lm.batch_size, bootstrap_iters=bootstrap_iters)


# ------------------------------------------------------------------------------------- per-item records

@dataclasses.dataclass(frozen=True)
class BenchmarkItem:
    """One document of an lm-eval task, as a study's item catalog lists it (see `benchmark_items`)."""
    task: str
    doc_id: int
    output_type: str
    n_choices: int  # 0 for generation tasks

    @property
    def chance(self) -> float:
        """Accuracy by guessing: 1 / choices for multiple choice; 0 for generated answers."""
        return 1.0 / self.n_choices if self.n_choices else 0.0


_ITEM_TYPES = ("multiple_choice", "generate_until")


def benchmark_items(task_names: Sequence[str], tm, *, limit: int | None = None) -> dict[str, list[BenchmarkItem]]:
    """The documents lm-eval will score for each task (its eval split, the first `limit`), in doc_id order.

    Raises:
        UserError: for a group name (list its tasks instead) or a task that is not multiple choice or
            generation (a perplexity task has no per-item accuracy).
    """
    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict(list(task_names), tm)
    out: dict[str, list[BenchmarkItem]] = {}
    for name in task_names:
        task = tasks.get(name)
        if task is None or isinstance(task, dict):
            raise UserError(f"lm-eval task {name!r}: a group, not a task; list its tasks by name")
        kind = task.OUTPUT_TYPE
        if kind not in _ITEM_TYPES:
            raise UserError(f"lm-eval task {name!r}: output type {kind!r} has no per-item accuracy "
                            f"(items need one of {', '.join(_ITEM_TYPES)})")
        docs = list(task.eval_docs)
        docs = docs[: int(limit)] if limit else docs
        out[name] = [BenchmarkItem(name, i, kind, len(task.doc_to_choice(d)) if kind == "multiple_choice" else 0)
                     for i, d in enumerate(docs)]
    return out


def item_rows(results: dict, task: str) -> dict[str, list]:
    """One task's per-document scores from `run_tasks(..., log_samples=True)`, in doc_id order.

    Multiple choice: correct = acc, gold_logprob = the gold option's log-likelihood, margin = gold minus
    the best wrong option. Generation: correct = the task's first metric under its first filter (e.g.
    exact_match, strict-match for gsm8k); gold_logprob and margin are NaN (nothing is scored as options).

    Returns:
        parallel lists {"item_id", "correct", "gold_logprob", "margin"}.
    """
    samples = results["samples"][task]
    filters = list(dict.fromkeys(s.get("filter", "none") for s in samples))
    chosen = [s for s in samples if s.get("filter", "none") == filters[0]]
    chosen.sort(key=lambda s: s["doc_id"])
    out: dict[str, list] = {"item_id": [], "correct": [], "gold_logprob": [], "margin": []}
    for s in chosen:
        out["item_id"].append(int(s["doc_id"]))
        if "acc" in s:  # multiple choice: [(ll, is_greedy)] per option
            lls = np.asarray([float(r[0]) for r in s["filtered_resps"]])
            gold = int(s["target"])
            out["correct"].append(int(round(float(s["acc"]))))
            out["gold_logprob"].append(float(lls[gold]))
            out["margin"].append(float(lls[gold] - np.max(np.delete(lls, gold))) if lls.size > 1 else float("nan"))
        else:
            name = next(m for m in s["metrics"] if m in s)
            out["correct"].append(int(round(float(s[name]))))
            out["gold_logprob"].append(float("nan"))
            out["margin"].append(float("nan"))
    return out
