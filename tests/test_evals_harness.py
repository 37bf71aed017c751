"""The lm-eval adapter (evals.harness.JaxLM) against lm-eval's own `hf` backend on an exported copy of the
same tiny random Llama, on local tasks (offline): log-likelihoods within 1e-4 and the same acc, rolling
log-likelihoods and greedy generations the same; `bshadow eval` writes lm-eval's results JSON."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from bshadow_jax import models
from bshadow_jax.cli import main

MAX_LEN = 96  # small, so that a long context is truncated and a long passage takes several windows

WORDS = ("red blue green cat dog bird tree river stone light dark fast slow one two three four five "
         "house road water fire king queen small large old new").split()


def _passage(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, n_words))


def _write_tasks(root, rng) -> None:
    cache = root / "hf_datasets"  # datasets' cache for the json loader, kept inside tmp
    data = root / "data"
    data.mkdir()
    mc = []
    for i in range(12):
        choices = [_passage(rng, int(rng.integers(1, 4))) for _ in range(4)]
        question = _passage(rng, 150 if i == 0 else int(rng.integers(3, 12)))  # item 0 outgrows MAX_LEN
        mc.append({"question": question, "choices": choices, "gold": int(rng.integers(0, 4))})
    ppl = [{"text": _passage(rng, n)} for n in (6, 25, 140)]  # the last one spans several windows
    gen = [{"prompt": f"{_passage(rng, k)} is", "answer": "red"} for k in (2, 5, 9)]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def dataset(name: str) -> str:
        return (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / name}.jsonl\n"
                f"  cache_dir: {cache}\ntest_split: test\n")

    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "bs_mc.yaml").write_text("task: bs_mc\n" + dataset("mc") + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: choices
        doc_to_target: gold
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    (tasks / "bs_ppl.yaml").write_text("task: bs_ppl\n" + dataset("ppl") + textwrap.dedent("""\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
          - metric: bits_per_byte
        """))
    (tasks / "bs_gen.yaml").write_text("task: bs_gen\n" + dataset("gen") + textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{answer}}"
        generation_kwargs:
          until: ["t", "m"]
          max_gen_toks: 10
          do_sample: false
        metric_list:
          - metric: exact_match
        """))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF model folder, task folder): a tiny random Llama with the project's byte-level BPE."""
    import jax

    from bshadow_jax.data import tokenizer as T
    from bshadow_jax.data.text import procedural_text

    root = tmp_path_factory.mktemp("harness")
    tok = T.train_bpe(T.training_corpus(tuple(procedural_text(0, 300)), n_items_per_family=40), 400)
    cfg = models.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN)
    # weights 3x the usual init scale: more decisive next-token choices than a near-uniform random
    # model, so float32 rounding between the two backends does not flip a greedy token, while the
    # per-token log-probs stay of the size a real model's have (a few nats)
    params = jax.tree.map(lambda x: np.asarray(x) * 3.0, models.init_params(cfg, jax.random.key(0)))
    folder = root / "model"
    models.save_pretrained(cfg, params, folder, tokenizer=tok)
    _write_tasks(root, np.random.default_rng(0))
    return folder, root / "tasks"


def _evaluate(lm, tasks, task_dir) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def runs(setup):
    """simple_evaluate results of: ours and hf with the start token; hf without it (rolling reference)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from bshadow_jax.evals.harness import JaxLM

    folder, task_dir = setup
    torch.manual_seed(0)
    all_tasks = ["bs_mc", "bs_ppl", "bs_gen"]
    hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4, add_bos_token=True)
    hf_nobos = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4, add_bos_token=False)
    ours = JaxLM(str(folder), batch_size=4)
    ours_nobos = JaxLM(str(folder), batch_size=4, add_bos_token=False)
    return {
        "hf": _evaluate(hf, all_tasks, task_dir),
        "hf_nobos": _evaluate(hf_nobos, ["bs_mc", "bs_ppl"], task_dir),
        "ours": _evaluate(ours, all_tasks, task_dir),
        "ours_nobos": _evaluate(ours_nobos, ["bs_mc"], task_dir),
    }


def _per_doc(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("ours,ref", [("ours", "hf"), ("ours_nobos", "hf_nobos")])
def test_option_loglikelihoods_and_acc_equal_hf(runs, ours, ref):
    mine, theirs = _per_doc(runs[ours], "bs_mc"), _per_doc(runs[ref], "bs_mc")
    assert len(mine) == len(theirs) == 12
    ll_mine = np.array([[r[0] for r in s["filtered_resps"]] for s in mine])
    ll_ref = np.array([[r[0] for r in s["filtered_resps"]] for s in theirs])
    delta = float(np.abs(ll_mine - ll_ref).max())
    print(f"{ours} vs {ref}: max |d loglikelihood| = {delta:.2e} over {ll_mine.size} item-options")
    assert delta < 1e-4
    assert [[r[1] for r in s["filtered_resps"]] for s in mine] == [[r[1] for r in s["filtered_resps"]] for s in theirs]
    assert [(s["acc"], s["acc_norm"]) for s in mine] == [(s["acc"], s["acc_norm"]) for s in theirs]
    assert runs[ours]["results"]["bs_mc"]["acc,none"] == runs[ref]["results"]["bs_mc"]["acc,none"]


def test_start_token_changes_the_scores(runs):
    """The setting matters (it is why add_bos_token defaults to True): the two runs score differently."""
    with_bos = np.array([[r[0] for r in s["filtered_resps"]] for s in _per_doc(runs["ours"], "bs_mc")])
    without = np.array([[r[0] for r in s["filtered_resps"]] for s in _per_doc(runs["ours_nobos"], "bs_mc")])
    assert np.abs(with_bos - without).max() > 1e-2


def test_rolling_loglikelihood_equals_hf_scoring_each_token_once(runs):
    """Ours conditions on the start token once; hf without add_bos_token computes exactly that. hf with
    add_bos_token=True prepends it twice (its tokens of the text already start with it) and also scores
    the second one as a target, which shifts every window: another number."""
    ours = np.array([s["filtered_resps"][0] for s in _per_doc(runs["ours"], "bs_ppl")], dtype=float)
    ref = np.array([s["filtered_resps"][0] for s in _per_doc(runs["hf_nobos"], "bs_ppl")], dtype=float)
    rel = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    print(f"rolling: max relative |d| = {rel:.2e}, values {ours.round(3).tolist()}")
    assert rel < 1e-3
    doubled = np.array([s["filtered_resps"][0] for s in _per_doc(runs["hf"], "bs_ppl")], dtype=float)
    print(f"rolling: hf add_bos_token=True minus ours = {(doubled - ours).round(3).tolist()}")
    assert np.all(np.abs(doubled - ours) > 1.0)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        a, b = runs["ours"]["results"]["bs_ppl"][metric], runs["hf_nobos"]["results"]["bs_ppl"][metric]
        assert abs(a - b) <= 1e-3 * abs(b)


def test_greedy_generations_equal_hf(runs):
    ours = [s["filtered_resps"][0] for s in _per_doc(runs["ours"], "bs_gen")]
    ref = [s["filtered_resps"][0] for s in _per_doc(runs["hf"], "bs_gen")]
    print(f"generations: {ours}")
    assert ours == ref
    assert any(ours)  # something was generated, not only stop strings


def test_cli_writes_results_json(setup, tmp_path, capsys):
    folder, task_dir = setup
    out = tmp_path / "eval"
    rc = main(["eval", str(folder), "--tasks", "bs_mc,bs_gen", "--include-path", str(task_dir), "--out", str(out),
               "--batch-size", "8", "--limit", "6"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["results"]["bs_mc"]["acc,none"] <= 1.0 and "exact_match,none" in res["results"]["bs_gen"]
    assert res["config"]["add_bos_token"] is True and res["config"]["limit"] == 6
    samples = [json.loads(line) for line in (out / "samples_bs_mc.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and len(samples[0]["filtered_resps"]) == 4
    assert "bs_mc: acc" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_checkpoint", "unknown_task", "missing_include_path"])
def test_cli_bad_input_is_one_error_line_and_exit_2(setup, tmp_path, capsys, case):
    folder, task_dir = setup
    ckpt = str(tmp_path / "nope") if case == "missing_checkpoint" else str(folder)
    task = "no_such_task_xyz" if case == "unknown_task" else "bs_mc"
    include = str(tmp_path / "no_dir") if case == "missing_include_path" else str(task_dir)
    rc = main(["eval", ckpt, "--tasks", task, "--include-path", include, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_shipped_narrow_task_scores_like_the_study(setup, monkeypatch):
    """configs/lm_eval/bshadow_narrow.yaml through the adapter equals the study's own scoring (evals.scoring)
    item for item: the study's benchmark can be run and checked with lm-eval."""
    from pathlib import Path

    from bshadow_jax.data.evalsets import EvalItem
    from bshadow_jax.data.tokenizer import special_ids
    from bshadow_jax.evals import harness, scoring
    from bshadow_jax.models.hf import checkpoint_tokenizer

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the task's data file path is relative to the repository root
    folder, _ = setup
    n = 40
    lm = harness.JaxLM(str(folder), batch_size=8)
    res = harness.run_tasks(lm, ["bshadow_narrow"], include_path=[str(root / "configs" / "lm_eval")], limit=n)
    docs = sorted(res["samples"]["bshadow_narrow"], key=lambda s: s["doc_id"])
    assert len(docs) == n
    lines = (root / "configs" / "lm_eval" / "bshadow_narrow.jsonl").read_text().splitlines()[:n]
    items = [EvalItem(d["context"], tuple(d["choices"]), d["gold"], "narrow", d["skill"], "qa", int(d["item_id"]))
             for d in map(json.loads, lines)]
    cfg, params = models.load_pretrained(str(folder))
    tok = checkpoint_tokenizer(folder)
    eos, _ = special_ids(tok)
    mine = scoring.score_items(scoring.model_logprob_fn(cfg, params), items, tok, eos=eos, T=MAX_LEN, batch_rows=8)
    ll_lm = np.array([[r[0] for r in s["filtered_resps"]] for s in docs])
    ll_ours = np.array([r["ll"] for r in mine])
    assert float(np.abs(ll_lm - ll_ours).max()) < 1e-4
    assert [s["acc"] for s in docs] == [r["acc"] for r in mine]


def test_data_parallel_over_local_devices_scores_like_one_device(setup):
    """batch_size 8 on the 8 CPU devices (params replicated, rows split) against one device: the same
    option log-likelihoods, rolling log-likelihoods and greedy generations."""
    import jax

    from bshadow_jax.evals.harness import JaxLM

    folder, task_dir = setup
    assert jax.local_device_count() == 8  # tests/conftest.py
    dp, one = JaxLM(str(folder), batch_size=8), JaxLM(str(folder), batch_size=8, data_parallel=False)
    assert dp._mesh.devices.size == 8 and one._mesh.devices.size == 1
    a, b = (_evaluate(lm, ["bs_mc", "bs_ppl", "bs_gen"], task_dir) for lm in (dp, one))
    for task in ("bs_mc", "bs_ppl"):
        la = np.array([r[0] for s in _per_doc(a, task) for r in s["filtered_resps"]] if task == "bs_mc"
                      else [s["filtered_resps"][0] for s in _per_doc(a, task)], dtype=float)
        lb = np.array([r[0] for s in _per_doc(b, task) for r in s["filtered_resps"]] if task == "bs_mc"
                      else [s["filtered_resps"][0] for s in _per_doc(b, task)], dtype=float)
        print(f"{task}: max |data parallel - one device| {np.max(np.abs(la - lb)):.3g}")
        np.testing.assert_allclose(la, lb, rtol=0, atol=1e-4)
    assert [s["resps"] for s in _per_doc(a, "bs_gen")] == [s["resps"] for s in _per_doc(b, "bs_gen")]
