"""report.md, the figures and the stdout summary of a study, from synthetic records (no training).

The studies are built by tests/studykit.py with known effects: a large planted effect on every claim
against none at all, so each verdict in the report is known in advance."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import yaml

from bshadow_jax.studies.evalsuite import EvalSuite
from studykit import ArmTruth, fake_eval_sets, synthetic_study
from testkit import FigureRecorder, check_png_figure, read_png

from bshadow_jax.studies import finalize, report
from bshadow_jax.studies.spec import load_study_config
from bshadow_jax.studies.summary import summary_lines

REGIME_ARMS = ("benchmark_aligned", "coverage_expanding", "token_matched", "optimizer_control")
LARGE = {"benchmark_aligned": ArmTruth(narrow=0.85, broad=0.25, log_ppl=4.6, entropy=0.60, eff_rank=30, tokens=300),
         "coverage_expanding": ArmTruth(narrow=0.40, broad=0.80, log_ppl=3.4, entropy=0.90, eff_rank=70, tokens=900),
         "token_matched": ArmTruth(narrow=0.85, broad=0.25, log_ppl=4.0, entropy=0.65, eff_rank=35, tokens=700),
         "optimizer_control": ArmTruth(narrow=0.42, broad=0.78, log_ppl=3.4, entropy=0.90, eff_rank=70, tokens=900)}
NULL = {a: ArmTruth() for a in REGIME_ARMS}
FLOOR = {"arms": {"benchmark_aligned": {"pairs": 3, "footprint": {"footprint_blocks_only.entropy": 0.91234,
                                                                  "footprint_blocks_only.delta_effective_rank": 12.3456},
                                        "delta_fro_total": 0.5, "delta_fro_blocks_only": 0.25},
                  "coverage_expanding": {"pairs": 3, "footprint": {"footprint_blocks_only.entropy": 0.8,
                                                                   "footprint_blocks_only.delta_effective_rank": 11.0},
                                         "delta_fro_total": 0.7, "delta_fro_blocks_only": 0.35}},
         "between_arms": {"coverage_expanding - benchmark_aligned": {
             "pairs": 3, "footprint": {"footprint_blocks_only.entropy": 0.7, "footprint_blocks_only.delta_effective_rank": 9.0},
             "delta_fro_total": 1.2, "delta_fro_blocks_only": 0.9, "over_floor_blocks_only": 3.0,
             "over_floor_total": 2.0}}}


def _eval_sets() -> EvalSuite:
    """Narrow items with 4 options (chance 0.25), broad items with 2 (chance 0.5): the chance levels differ."""
    es = fake_eval_sets(n_narrow=40, n_broad=40, n_text=6)
    world = dataclasses.replace(es.world, broad=tuple(dataclasses.replace(it, options=("a", "b")) for it in es.world.broad))
    return dataclasses.replace(es, world=world)


def _build(truths, *, study="regimes", cfg=None, floor=None, seed=0):
    cfg = cfg or load_study_config("configs/regimes_cpu.yaml", ["analysis.n_boot=200"])
    records, base_evals, es = synthetic_study(truths, bases=(0, 1), seeds=(0, 1, 2), seed=seed, es=_eval_sets())
    res = finalize.build_results(cfg, records, study=study, eval_sets=es, base_evals=base_evals, floor=floor or {})
    return res, records


@pytest.fixture(scope="module")
def large():
    return _build(LARGE, floor=FLOOR)


@pytest.fixture(scope="module")
def null():
    return _build(NULL)


@pytest.fixture(scope="module")
def repetition(tmp_path_factory):
    raw = yaml.safe_load(open("configs/repetition_cpu.yaml"))
    raw["claims"].pop("small_fraction", None)
    raw["claims"]["equivalence_margins"] = {"footprint_blocks_only.entropy": 0.05,
                                            "footprint_blocks_only.delta_effective_rank": 5.0}
    path = tmp_path_factory.mktemp("cfg") / "repetition.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_study_config(path, ["analysis.n_boot=200"])
    plain = ArmTruth(narrow=0.5, broad=0.6, entropy=0.85, eff_rank=60)
    truths = {"benchmark_aligned": ArmTruth(narrow=0.8, broad=0.3, entropy=0.6, eff_rank=30), "plain": plain,
              "prompt_repetition": plain, "dedup": dataclasses.replace(plain, entropy=0.5, eff_rank=20)}
    return _build(truths, study="repetition", cfg=cfg)


BASE_CURVES = {0: [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}], 1: [{"step": 1, "loss": 5.5}]}


@pytest.fixture(scope="module")
def large_report(large, tmp_path_factory):
    """The large study's report, written once: (report.md text, figure names, its folder, the FigureRecorder)."""
    out = tmp_path_factory.mktemp("large")
    with FigureRecorder() as rec:
        md, figs = _md(*large, out, base_curves=BASE_CURVES)
    return md, figs, out, rec


def _md(res, records, tmp_path, **kw) -> tuple[str, list[str]]:
    figs = report.write_study_report(tmp_path, title="t", results=res, records_by_arm=records,
                                     arm_notes={a: f"note on {a}" for a in records}, **kw)
    return (tmp_path / "report.md").read_text(), figs


def _section(md: str, heading: str) -> str:
    start = md.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    nxt = re.search(rf"\n{level} ", md[start + len(heading) + 2:])
    return md[start: start + len(heading) + 2 + nxt.start()] if nxt else md[start:]


def _table_rows(text: str, first_cell: str | None = None) -> list[list[str]]:
    rows = [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("|---")]
    return [r for r in rows if first_cell is None or r[0] == first_cell]


# ---------------------------------------------------------------- findings and claims

def test_findings_give_each_claims_verdict_large_effect_vs_none(large, null):
    res_l, _ = large
    res_n, _ = null
    assert {c["id"]: c["verdict"] for c in res_l["claims"]} == {"C1": "held", "C2": "held", "C3": "held"}
    assert {c["id"]: c["verdict"] for c in res_n["claims"]} == {"C1": "inconclusive", "C2": "inconclusive",
                                                                "C3": "inconclusive"}
    for res in (res_l, res_n):
        md = "\n".join(report.findings_md(res["claims"]))
        findings = [ln for ln in md.splitlines() if ln.startswith("**C")]
        assert [ln.split(".**")[0] for ln in findings] == [f"**{c['id']} — {c['verdict']}" for c in res["claims"]]
        for c, ln in zip(res["claims"], findings):
            for t in c["tests"]:  # each test's difference and 95% interval, rounded by its metric
                kind = report.metric_kind(t["metric"])
                assert f"{t['comparison']} = {report.fmt_num(t['diff'], kind, signed=True)} [" in ln, (t, ln)
                assert f"]: {t['verdict']}" in ln
    c1 = next(c for c in res_l["claims"] if c["id"] == "C1")
    acc = next(t for t in c1["tests"] if t["measure"] == "narrow.acc")
    want = f"{report.fmt_num(acc['diff'], 'acc', signed=True)} [{report.fmt_num(acc['lo'], 'acc', signed=True)}, " \
           f"{report.fmt_num(acc['hi'], 'acc', signed=True)}]"
    assert want in "\n".join(report.findings_md(res_l["claims"]))
    assert acc["diff"] > 0.3 and want.startswith("+0.4")


def test_claim_wording_appears_only_as_the_papers_claim(large, large_report, tmp_path):
    res, _ = large
    md = large_report[0]
    for c in res["claims"]:
        hits = [ln for ln in md.splitlines() if c["claim"] in ln]
        assert len(hits) == 1 and hits[0].startswith("> Paper's claim"), (c["id"], hits)
        assert md.index(hits[0]) > md.index(f"**{c['id']} — {c['verdict']}.**")  # the finding comes first
    assert md.index("## Findings") < md.index("## Power") < md.index("## Base before fine-tuning") \
        < md.index("## Scores") < md.index("## Footprints") < md.index("## Files")
    out = "\n".join(summary_lines(res, str(tmp_path)))
    assert "claim C1: held" in out and "claim C2: held" in out
    assert all(c["claim"] not in out for c in res["claims"])


def test_design_chance_and_scores(large, large_report):
    res, _ = large
    md = large_report[0]
    design = _section(md, "## Design")
    assert "narrow 40 items (chance 0.250)" in design and "broad 40 items (chance 0.500)" in design
    assert "6 held-out text passages" in design and "n_boot = 200" in design
    assert "hierarchical bootstrap over bases, seeds and items" in design
    assert _table_rows(design, "benchmark_aligned") == [["benchmark_aligned", "2 (0, 1)", "3 (0, 1, 2)", "6",
                                                         "note on benchmark_aligned"]]
    scores = _section(md, "## Scores")
    head = _table_rows(scores)[0]
    assert "narrow acc (chance 0.250)" in head and "broad acc (chance 0.500)" in head
    e = res["arms"]["coverage_expanding"]
    row = _table_rows(scores, "coverage_expanding")[0]
    assert row[2] == report.fmt_ci(e["narrow"]["score"], "acc")
    assert row[6] == report.fmt_ci(e["perplexity"]["value"], "ppl")
    assert re.fullmatch(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", row[6])  # perplexity: one decimal
    assert _table_rows(scores, "base (before fine-tuning)")
    base = _section(md, "## Base before fine-tuning")
    t = res["base"]["above_chance"]["broad"]
    assert report.fmt_ci({"mean": t["diff"], "lo": t["lo"], "hi": t["hi"]}, "acc", signed=True) in base
    assert "Held-out perplexity:" in base


def test_category_marker_only_where_no_arm_is_above_chance():
    def ci(lo, hi):
        return {"mean": (lo + hi) / 2, "lo": lo, "hi": hi}
    # x: every arm contains chance; z: every arm below or at chance; y: arm b is above chance
    arms = {a: {"broad": {"by_category": {"x": ci(0.1, 0.4), "y": ci(0.1, 0.4) if a == "a" else ci(0.3, 0.6),
                                          "z": ci(0.1, 0.2) if a == "a" else ci(0.15, 0.3)},
                          "chance_by_category": {"x": 0.25, "y": 0.25, "z": 0.25}}} for a in ("a", "b")}
    head = report.category_table(arms, "broad").splitlines()[0]
    assert f"x {report.CHANCE_MARK} (chance 0.250)" in head and "| y (chance 0.250)" in head
    assert f"z {report.CHANCE_MARK} (chance 0.250)" in head


# ---------------------------------------------------------------- power

def test_power_table_has_one_row_per_voted_test(large, null):
    for res in (large[0], null[0]):
        power = "\n".join(report.power_md(res))
        rows = [r for r in _table_rows(power) if r[0] != "claim"]
        n_tests = sum(len(c["tests"]) for c in res["claims"])
        assert len(rows) == n_tests == len(res["power"])
        for r, p in zip(rows, res["power"]):
            assert r[4] == report.fmt_num(p["mde"], report.metric_kind(p["metric"]))
            assert r[5] == ("yes" if p["observed_exceeds_mde"] else "no")
        readings = [ln for ln in power.splitlines() if ln.startswith("- C")]
        assert [ln[2:4] for ln in readings] == [c["id"] for c in res["claims"]]
        assert "significant in the wrong direction" in power
    # a null study: every observed difference of C2 is far below what the design can detect? at least one is
    null_power = "\n".join(report.power_md(null[0]))
    assert "observed" in null_power and "against mde" in null_power


# ---------------------------------------------------------------- footprints, tokens, noise floor

def test_token_diversity_and_noise_floor_sections(large, null, large_report):
    res, _ = large
    md = large_report[0]
    tokens = _section(md, "### Token diversity and the embeddings")
    row = _table_rows(tokens, "benchmark_aligned")[0]
    assert re.fullmatch(r"\d+ \[\d+, \d+\]", row[1])  # token counts without decimals
    assert row[2:5] == ["0.100", "0.200", "0.300"]  # embed, lm_head and both: studykit's module shares
    e = res["arms"]["benchmark_aligned"]["footprint_variants"]
    assert row[5:7] == [report.fmt_ci(e["all"]["entropy"], "entropy"), report.fmt_ci(e["blocks_only"]["entropy"], "entropy")]
    floor = _section(md, "### Noise floor")
    assert _table_rows(floor, "benchmark_aligned")[0] == ["benchmark_aligned", "3", "0.912", "12.35", "0.2500", "0.5000"]
    assert _table_rows(floor, "coverage_expanding - benchmark_aligned")[0][5] == "3.00"
    c2 = next(c for c in res["claims"] if c["id"] == "C2")
    ratios = [r[3] for r in _table_rows(floor) if r[0] in {t["comparison"] for t in c2["tests"]}]
    assert ratios == [report.fmt_num(t["diff_over_seed_sd"], "ratio", signed=True) for t in c2["tests"]]
    fps = _section(md, "## Footprints")
    assert "entropy (blocks only)" in fps and "entropy (per parameter)" in fps
    assert "token-diversity table" in fps  # the heatmap caption says where embed and lm_head went
    assert "(no noise floor computed" in "\n".join(report.noise_floor_md(null[0]))


# ---------------------------------------------------------------- figures

def test_figures_are_pngs_of_the_numbers(large, large_report):
    res, records = large
    md, figs, tmp_path, saved_figures = large_report
    assert set(figs) >= {"narrow_broad.png", "perplexity.png", "footprint_heatmaps.png", "effective_rank_heatmaps.png",
                         "effective_rank.png", "footprint_curves.png", "training_curves.png", "regime_score.png"}
    found = {f: saved_figures.figure_for(tmp_path / f) for f in figs}
    for f, (fig, kw) in found.items():
        check_png_figure(tmp_path / f, fig, kw)
        assert f"({f})" in md
    read_png(tmp_path / "perplexity.png")
    # narrow_broad: chance dashed on both axes, each arm's point at its means, the base's at its means
    ax = found["narrow_broad.png"][0].axes[0]
    lines = ax.get_lines()
    vert = [ln for ln in lines if ln.get_linestyle() == "--" and np.ptp(ln.get_xdata()) == 0]
    horiz = [ln for ln in lines if ln.get_linestyle() == "--" and np.ptp(ln.get_ydata()) == 0]
    assert any(np.allclose(ln.get_xdata(), 0.25) for ln in vert) and any(np.allclose(ln.get_ydata(), 0.5) for ln in horiz)
    points = [tuple(ln.get_xydata()[0]) for ln in lines if len(ln.get_xydata()) == 1]
    for e in list(res["arms"].values()) + [res["base"]]:
        want = (e["narrow"]["score"]["mean"], e["broad"]["score"]["mean"])
        assert any(np.allclose(p, want) for p in points), (want, points)
    # perplexity: one point per arm at its mean, the base as a vertical line
    ax = found["perplexity.png"][0].axes[0]
    xs = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if len(ln.get_xdata()) == 1
                and ln.get_marker() in report._MARKERS)  # not the error bars' caps
    np.testing.assert_allclose(xs, sorted(e["perplexity"]["value"]["mean"] for e in res["arms"].values()))
    assert any(np.allclose(ln.get_xdata(), res["base"]["perplexity"]["value"]["mean"]) for ln in ax.get_lines())
    # curves: mean over every run of an arm (both bases), a legend on every panel with lines
    fig, _ = found["training_curves.png"]
    for a in fig.axes:
        if a.get_lines():
            assert a.get_legend() is not None
    got = {ln.get_label(): ln.get_xydata() for ln in fig.axes[0].get_lines()}
    for arm in records:
        np.testing.assert_allclose(got[arm], [[s, 3.0 / s] for s in (1, 2, 3, 4)])
    assert [ln.get_label() for ln in fig.axes[1].get_lines()] == ["base 0", "base 1"]
    fig, _ = found["footprint_curves.png"]
    assert all(a.get_legend() is not None for a in fig.axes)
    entropy = {ln.get_label(): ln.get_xydata() for ln in fig.axes[1].get_lines()}
    for arm, recs in records.items():
        ent = np.mean([r["footprint_curve"][-1]["entropy"] for r in recs])
        np.testing.assert_allclose(entropy[arm], [[s, ent * s / 4] for s in (1, 2, 3, 4)])
    # one style per arm across figures
    nb = {ln.get_label(): ln.get_color() for ln in found["narrow_broad.png"][0].axes[0].get_lines()}
    fc = {ln.get_label(): ln.get_color() for ln in fig.axes[0].get_lines()}
    assert all(nb.get(a) == fc[a] for a in records if a in nb)


def test_eight_arms_get_distinct_line_styles(tmp_path, saved_figures):
    names = [f"arm{i}" for i in range(8)]
    styles = report.arm_styles(names)
    combos = {(s["color"], s["ls"], s["marker"]) for s in styles.values()}
    assert len(combos) == 8 and len({s["color"] for s in styles.values()}) == 8
    for a, b in zip(names, names[1:]):  # neighbours differ in line style and marker too
        assert styles[a]["ls"] != styles[b]["ls"] and styles[a]["marker"] != styles[b]["marker"]
    assert len({tuple(s.values()) for s in report.arm_styles([str(i) for i in range(140)]).values()}) == 140
    records, _, _ = synthetic_study({n: ArmTruth() for n in names}, bases=(0,), seeds=(0,))
    report.fig_footprint_curves(records, tmp_path / "fc.png")
    fig, kw = saved_figures.figure_for(tmp_path / "fc.png")
    check_png_figure(tmp_path / "fc.png", fig, kw)
    for ax in fig.axes:
        drawn = [(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in ax.get_lines() if ln.get_label() in names]
        assert len(drawn) == 8 and len(set(drawn)) == 8
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted(names)


# ---------------------------------------------------------------- repetition

def test_repetition_report_shows_equivalence_margins(repetition, tmp_path):
    res, records = repetition
    claims = {c["id"]: c for c in res["claims"]}
    assert claims["R1"]["verdict"] == "held" and claims["R2"]["verdict"] == "not held"
    md, _ = _md(res, records, tmp_path)
    r1 = _section(md, "### R1 (held)")
    rows = [r for r in _table_rows(r1) if r[0].startswith("footprint_blocks_only")]
    assert [r[2] for r in rows] == ["±0.050", "±5.00"]
    for r, t in zip(rows, claims["R1"]["tests"]):
        kind = report.metric_kind(t["metric"])
        assert r[4] == report.fmt_ci({"mean": t["diff"], "lo": t["lo90"], "hi": t["hi90"]}, kind, signed=True)
        assert r[5] == report.fmt_num(t["min_margin"], kind)
    assert "90% interval" in r1 and "min margin" in r1
    assert "**R2 — not held.**" in md and "against ±0.050: not held" in md
    power = _section(md, "## Power")
    assert "min margin" in _table_rows(power)[0]
    assert "Reported beside the tests, not voted" in r1  # the score shifts


def test_rounding_is_by_metric_kind():
    f = report.fmt_num
    assert (f(0.12345, "acc"), f(-0.12345, "margin"), f(123.456, "ppl"), f(2.345, "rank"), f(101.6, "tokens")) == \
        ("0.123", "-0.123", "123.5", "2.35", "102")
    assert f(None, "acc") == f(float("nan"), "acc") == "n/a" and f(-0.0001, "acc", signed=True) == "0.000"
    assert report.metric_kind("footprint_blocks_only.delta_effective_rank") == "rank"
    assert report.metric_kind("narrow.acc") == "acc" and report.metric_kind("log_ppl") == "log_ppl"
    assert report.fmt_ci({"mean": 0.5, "lo": None, "hi": None}, "acc") == "0.500 [n/a]"
    assert report.fmt_ci(None) == "n/a"
    assert report.fmt_ci({"mean": 0.01, "lo": -0.02, "hi": 0.04}, "acc", signed=True) == "+0.010 [-0.020, +0.040]"


def test_regimes_cpu_config_is_the_designed_study():
    raw = yaml.safe_load(open("configs/regimes_cpu.yaml"))
    ft = raw["finetune"]
    assert "seed" not in ft and "model" not in ft
    assert len(raw["seeds"]) >= 3
