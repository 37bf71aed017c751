"""grain pipelines: named streams -> tokenize -> mix by weight -> pack -> batch, staged by step.

    ds = make_train_dataset(data_cfg, tokenizer, seq_len=128, batch_size=16, seed=0)
    it = iter(ds); batch = next(it)        # dict of numpy arrays, see BATCH_KEYS
    state = it.get_state(); it.set_state(state)   # or grain.checkpoint.CheckpointSave(it)

Every stream is an index-addressable `grain.MapDataset` (item i is a pure function of the
seeds and i), repeated forever, so `IterDataset.mix` never runs dry and a restored iterator
yields exactly the batches it would have yielded. Hosts take disjoint slices of every
stream's index space (`shard_index::shard_count`). Examples are packed without padding
(concat-then-split, the default: every arm sees exactly steps x batch x seq_len tokens) or
first-fit with padding (`packing: first_fit`: no example is split across rows; examples
longer than seq_len are truncated).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Sequence

import grain
import numpy as np

from bshadow_jax.data import decontam, evalsets, interventions, world
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.hf_source import load_hf_examples
from bshadow_jax.data.interventions import Plan, StreamSpec
from bshadow_jax.data.text import text_corpus
from bshadow_jax.data.tokenizer import special_ids

log = logging.getLogger("bshadow_jax.data.pipeline")

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
_INFINITE = 2**62
# Synchronous reads: grain's default (16 threads, 500 prefetched elements per stream) costs more
# than it saves on a 2-core machine with cheap elements, and makes every restore replay 500.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


# ----------------------------------------------------------------------------- example streams
def world_example(i: int, *, name: str, spec: StreamSpec, cfg: DataConfig, seed: int, stage: int = 0) -> dict:
    """Example `i` of a world stream: pure in (seeds, stream, stage, i); never an eval item.

    The family and format are drawn first, then items of that family are drawn until one is
    outside the eval partition and shares no 13-gram with any eval item (so both filters leave
    the stream's family and format shares as specified).
    """
    salt = spec.pool_of or name
    rng = world.rng_for(cfg.world_seed, seed, stage if not spec.pool_of else "pool", salt, i)
    fam = spec.families[rng.randrange(len(spec.families))]
    fmt = spec.rewrite_to or spec.formats[rng.randrange(len(spec.formats))]
    banned = evalsets.eval_ngram_hashes(cfg.world_seed, cfg.eval_fraction)
    for _ in range(10_000):
        item = world.make_item(fam, rng, cfg.world_seed)
        if decontam.is_eval_item(item.item_id, cfg.eval_fraction):
            continue
        ex = world.render(item, fmt, prompt_repetition=spec.prompt_repetition)
        if not decontam.shares_ngram(ex.prompt + ex.answer, banned):
            return {"prompt": ex.prompt, "answer": ex.answer, "family": ex.family, "format": ex.format,
                    "item_id": ex.item_id, "stream": name}
    raise RuntimeError(f"{fam}/{fmt}: no uncontaminated item in 10000 draws")


def _text_record(passage: str, *, name: str = "text") -> dict:
    return {"prompt": "", "answer": passage, "family": "text", "format": "text", "item_id": 0, "stream": name}


def _with_stream(rec: dict, *, name: str) -> dict:
    return {**rec, "stream": name}


@functools.lru_cache(maxsize=4)
def _hf_records(hf_cfg) -> tuple[dict, ...]:
    return tuple(load_hf_examples(hf_cfg))


def _dedup_indices(name: str, spec: StreamSpec, cfg: DataConfig, seed: int, stage: int) -> list[int]:
    seen, keep = set(), []
    for i in range(spec.pool_size):
        r = world_example(i, name=name, spec=spec, cfg=cfg, seed=seed, stage=stage)
        key = (r["prompt"], r["answer"])
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def example_stream(name: str, spec: StreamSpec, cfg: DataConfig, *, seed: int, stage: int = 0,
                   shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """An endless MapDataset of example records {prompt, answer, family, format, item_id, stream}."""
    if spec.kind == "world":
        fn = functools.partial(world_example, name=name, spec=spec, cfg=cfg, seed=seed, stage=stage)
        if spec.pool_size > 0:
            idx = _dedup_indices(name, spec, cfg, seed, stage) if spec.dedup else list(range(spec.pool_size))
            idx = idx[shard_index::shard_count] or idx[:1]
            return grain.MapDataset.source(idx).shuffle(seed=_seed(seed, stage, name)).repeat(None).map(fn)
        return grain.MapDataset.range(shard_index, _INFINITE, shard_count).map(fn)
    if spec.kind == "text":
        passages = list(text_corpus(cfg.text_key).train)[shard_index::shard_count]
        src = grain.MapDataset.source(passages).shuffle(seed=_seed(seed, stage, name)).repeat(None)
        return src.map(functools.partial(_text_record, name=name))
    if spec.kind == "hf":
        if cfg.hf is None:
            raise ValueError("an hf stream needs data.hf")
        recs = list(_hf_records(cfg.hf))[shard_index::shard_count]
        src = grain.MapDataset.source(recs).shuffle(seed=_seed(seed, stage, name)).repeat(None)
        return src.map(functools.partial(_with_stream, name=name))
    raise ValueError(f"unknown stream kind {spec.kind!r}")


def _seed(seed: int, stage: int, name: str) -> int:
    return int(world.rng_for("shuffle", seed, stage, name).getrandbits(31))


def mixed_examples(cfg: DataConfig, plan: Plan, *, seed: int, stage: int = 0, shard_index: int = 0,
                   shard_count: int = 1) -> grain.IterDataset:
    """Example records of one stage, mixed by the stage's weights (before tokenization)."""
    weights = plan.stages[stage][1]
    streams = {
        n: example_stream(n, plan.streams[n], cfg, seed=seed, stage=stage, shard_index=shard_index,
                          shard_count=shard_count).to_iter_dataset(_READ)
        for n in sorted(weights)
    }
    if len(streams) == 1:
        return next(iter(streams.values()))
    return grain.IterDataset.mix(streams, {n: weights[n] for n in streams})


# ----------------------------------------------------------------------------- tokenize + pack
@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """record -> {inputs, targets, loss_mask}: [sep] prompt answer [sep], shifted by one."""

    backend: Any
    eos: int
    answer_only: bool
    max_len: int  # 0: no truncation

    answers: dict = dataclasses.field(default_factory=dict, compare=False)  # answers repeat a lot

    def __call__(self, rec: dict) -> dict:
        p = self.backend.encode(rec["prompt"], add_special_tokens=False).ids if rec["prompt"] else []
        a = self.answers.get(rec["answer"])
        if a is None:
            a = self.backend.encode(rec["answer"], add_special_tokens=False).ids
            if len(self.answers) < 100_000 and len(rec["answer"]) < 64:
                self.answers[rec["answer"]] = a
        seq = np.asarray([self.eos, *p, *a, self.eos], dtype=np.int32)
        mask = np.ones(len(seq) - 1, dtype=np.float32)
        if self.answer_only and p:
            mask[: len(p)] = 0.0  # targets 0..len(p)-1 are prompt tokens
        if self.max_len and len(seq) - 1 > self.max_len:
            seq, mask = seq[: self.max_len + 1], mask[: self.max_len]
        return {"inputs": seq[:-1], "targets": seq[1:], "loss_mask": mask}


def _finalize(batch: dict) -> dict:
    seg = batch["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs": batch["inputs"].astype(np.int32),
        "targets": batch["targets"].astype(np.int32),
        "segment_ids": seg,
        "positions": batch["inputs_positions"].astype(np.int32),
        "loss_mask": (batch["loss_mask"] * (seg > 0)).astype(np.float32),
    }


def _pack_and_batch(ds: grain.IterDataset, cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int):
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    if cfg.packing == "concat":
        packed = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    else:
        packed = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=max(batch_size, 8), seed=seed, shuffle_bins=False
        )
    return packed.batch(batch_size, drop_remainder=True).map(_finalize)


# ----------------------------------------------------------------------------- staging
class _StagedIterator(grain.DatasetIterator):
    def __init__(self, parents: list, starts: list[int]):
        super().__init__(parents)
        self._its = parents
        self._starts = starts
        self._step = 0

    def _stage(self) -> int:
        return max(i for i, s in enumerate(self._starts) if self._step >= s)

    def __next__(self):
        value = next(self._its[self._stage()])
        self._step += 1
        return value

    def get_state(self):
        return {"step": self._step, "stages": [it.get_state() for it in self._its]}

    def set_state(self, state):
        self._step = int(state["step"])
        for it, st in zip(self._its, state["stages"]):
            it.set_state(st)


class StagedIterDataset(grain.IterDataset):
    """Batches from stage k's pipeline from step starts[k] on (one element = one step)."""

    def __init__(self, parents: list[grain.IterDataset], starts: list[int]):
        super().__init__(parents)
        self._stage_ds = parents
        self._starts = starts

    def __iter__(self):
        return _StagedIterator([iter(p) for p in self._stage_ds], self._starts)

    def __str__(self) -> str:
        return f"StagedIterDataset(starts={self._starts})"


# ----------------------------------------------------------------------------- public
def resolve_plan(data_cfg: DataConfig, tokenizer=None, *, tokens_per_step: int = 0, seed: int = 0) -> Plan:
    """The config's plan with the repeated subset sized for `tokens_per_step`."""
    plan = interventions.plan_from_config(data_cfg)
    if data_cfg.repeat_k > 1 and data_cfg.repeat_steps > 0 and not data_cfg.dedup:
        w0 = plan.stages[0][1]
        world_share = sum(v for n, v in w0.items() if plan.streams[n].kind == "world")
        if world_share > 0 and tokenizer is not None and tokens_per_step > 0:
            mean = mean_example_tokens(data_cfg, plan, tokenizer, seed=seed)
            pool = interventions.pool_size_for(k=data_cfg.repeat_k, steps=data_cfg.repeat_steps,
                                               tokens_per_step=tokens_per_step, world_share=world_share,
                                               mean_item_tokens=mean)
            plan = interventions.repeated_subset(plan, k=data_cfg.repeat_k, steps=data_cfg.repeat_steps,
                                                 pool_size=pool)
            log.info("repeated subset: %d items x %d during the first %d steps", pool, data_cfg.repeat_k,
                     data_cfg.repeat_steps)
    return plan


def mean_example_tokens(data_cfg: DataConfig, plan: Plan, tokenizer, *, seed: int = 0, n: int = 256) -> float:
    """Mean tokens per packed example of the world streams of stage 0 (sizes the repeated pool)."""
    eos, _ = special_ids(tokenizer)
    tok = _Tokenize(tokenizer.backend_tokenizer, eos, False, 0)
    lens = []
    for name, w in plan.stages[0][1].items():
        spec = plan.streams[name]
        if spec.kind != "world":
            continue
        src = example_stream(name, spec, data_cfg, seed=seed)
        lens += [len(tok(src[i])["inputs"]) for i in range(n)]
    return float(np.mean(lens)) if lens else 1.0


def make_train_dataset(data_cfg: DataConfig, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                       shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """An endless grain IterDataset of batches (numpy dict, see BATCH_KEYS) for this host.

    `batch_size` is this host's rows per step; repeated-subset sizing uses the global batch
    (batch_size x shard_count).
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    plan = resolve_plan(data_cfg, tokenizer, tokens_per_step=batch_size * shard_count * seq_len, seed=seed)
    eos, _ = special_ids(tokenizer)
    tok = _Tokenize(tokenizer.backend_tokenizer, eos, data_cfg.answer_only_loss,
                    seq_len if data_cfg.packing == "first_fit" else 0)
    stages = []
    for k in range(len(plan.stages)):
        ex = mixed_examples(data_cfg, plan, seed=seed, stage=k, shard_index=shard_index, shard_count=shard_count)
        stages.append(_pack_and_batch(ex.map(tok), data_cfg, seq_len=seq_len, batch_size=batch_size, seed=seed))
    if len(stages) == 1:
        return stages[0]
    return StagedIterDataset(stages, [s for s, _ in plan.stages])


def first_batches(data_cfg: DataConfig, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                  steps: int) -> list[dict]:
    """The first `steps` batches of make_train_dataset (one host), as a list."""
    it = iter(make_train_dataset(data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed))
    return [next(it) for _ in range(steps)]


def replay_dataset(batches: Sequence[dict]) -> grain.IterDataset:
    """A checkpointable grain IterDataset of the given batches, in order (see first_batches)."""
    return grain.MapDataset.source(list(batches)).to_iter_dataset(_READ)


def data_metadata(data_cfg: DataConfig) -> dict:
    """What a run trains on, for logs and reports (which text source was really used, the plan)."""
    plan = interventions.plan_from_config(data_cfg)
    meta: dict = {"arm": data_cfg.arm, "stages": [[s, w] for s, w in plan.stages],
                  "streams": {n: dataclasses.asdict(s) for n, s in plan.streams.items()}}
    if any(s.kind == "text" for s in plan.streams.values()):
        meta["text"] = text_corpus(data_cfg.text_key).metadata
    return meta


class TokenCounter:
    """A pass-through batch map that collects the token ids of the first `steps` batches it sees.

    Mapped onto the training dataset, it counts what the run really fed without a second pass over
    the stream; `complete` is False when it saw fewer than `steps` batches (a resumed run), and then
    `distinct_tokens` recomputes the count.
    """

    def __init__(self, steps: int):
        self.steps = int(steps)
        self.batches = 0
        self._ids: set[int] = set()

    def __call__(self, batch: dict) -> dict:
        if self.batches < self.steps:
            real = batch["segment_ids"] > 0
            self._ids.update(np.unique(np.concatenate([batch["inputs"][real], batch["targets"][real]])).tolist())
        self.batches += 1
        return batch

    @property
    def complete(self) -> bool:
        return self.batches >= self.steps

    @property
    def count(self) -> int:
        return len(self._ids)

    def ids_bytes(self) -> bytes:
        """The ids seen, as int32 bytes (processes of a multi-process run send theirs to process 0)."""
        return np.asarray(sorted(self._ids), np.int32).tobytes()

    @staticmethod
    def union_count(payloads: list[bytes]) -> int:
        """Distinct ids over several processes' `ids_bytes`."""
        return len(set(np.concatenate([np.frombuffer(b, np.int32) for b in payloads]).tolist()))


def distinct_tokens(data_cfg: DataConfig, tokenizer, *, seq_len: int, batch_size: int, seed: int, steps: int) -> int:
    """How many distinct token ids the first `steps` batches of this stream feed (inputs and targets of
    real segments): with Adam from a fresh state, an embedding row no batch touches gets no update, so
    this bounds the rank of the embedding's delta, whatever the data teach."""
    counter = TokenCounter(steps)
    it = iter(make_train_dataset(data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed))
    for _ in range(steps):
        counter(next(it))
    return counter.count
