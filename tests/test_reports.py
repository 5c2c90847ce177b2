"""Reports: persistence and Jaccard against hand-computed answers, the run report's numbers
against the CSVs, `make compare` across checkpoints, and both pages rendered in headless
Chromium."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from PIL import Image

from unlib import compare
from unlib.html_report import paper_comparison_html
from unlib.paper_reference import published_reference, rank_recall
from unlib.plots import activation_histogram_svg

REPO = Path(__file__).resolve().parent.parent
MODELS = "toy-zoo-mini"
ARGS = ["--models", MODELS, "--n-tokens", "6000", "--threshold", "0.1", "--device", "cpu", "--scheduler", "local"]


def planted() -> tuple[dict, dict]:
    def table(keys, values=None):
        return pd.DataFrame({"layer": [k[0] for k in keys], "neuron": [k[1] for k in keys],
                             "excess_correlation": values or [0.6] * len(keys)})
    universal = {100: table([(0, 1), (0, 2), (1, 3)]), 250: table([(0, 1), (1, 3), (1, 4)]),
                 500: table([(0, 1)]), 900: table([])}
    everything = [(l, n) for l in range(2) for n in range(5)]
    excess = {s: table(everything, [0.1 * s / 1000 + 0.01 * i for i in range(10)]) for s in universal}
    return excess, universal


def test_persistence_and_jaccard_against_hand_computation():
    excess, universal = planted()
    sets = compare.neuron_sets(universal)
    p = compare.persistence(sets)
    assert p.loc[100, 250] == pytest.approx(2 / 3) and p.loc[100, 500] == pytest.approx(1 / 3)
    assert p.loc[250, 500] == pytest.approx(1 / 3) and p.loc[500, 900] == 0
    assert np.isnan(p.loc[250, 100]) and np.isnan(p.loc[100, 100]) and p.loc[900].isna().all()
    j = compare.jaccard(sets)
    assert j.loc[100, 250] == pytest.approx(2 / 4) and j.loc[250, 100] == pytest.approx(0.5)
    assert j.loc[100, 500] == pytest.approx(1 / 3) and j.loc[100, 100] == 1 and j.loc[900, 100] == 0
    assert np.isnan(j.loc[900, 900])
    t = compare.trajectories(excess, sets)
    assert len(t) == 4
    first = dict(zip(zip(t["layer"], t["neuron"]), t["first_universal_checkpoint"]))
    assert first == {(0, 1): 100, (0, 2): 100, (1, 3): 100, (1, 4): 250}
    assert t.loc[(t.layer == 1) & (t.neuron == 4), "checkpoint_500"].item() == pytest.approx(0.05 + 0.09)
    halves = {100: ({(0, 1), (0, 2)}, {(0, 1), (1, 3), (1, 4)}), 250: ({(1, 3)}, set()),
              500: ({(0, 1)}, {(0, 1)}), 900: (set(), set())}
    by = compare.universality_by_checkpoint(excess, universal, halves)
    overall = by[by.layer.astype(str) == "all"].set_index("checkpoint")
    assert list(overall["n_universal"]) == [3, 3, 1, 0] and overall.loc[100, "fraction"] == pytest.approx(0.3)
    assert by[(by.checkpoint == 250) & (by.layer.astype(str) == "1")]["n_universal"].item() == 2
    assert list(by.columns[-3:]) == ["fraction_half_a", "fraction_half_b", "split_half_jaccard"]
    assert list(overall["fraction_half_a"]) == [0.2, 0.1, 0.1, 0] and list(overall["fraction_half_b"]) == [0.3, 0, 0.1, 0]
    assert overall.loc[100, "split_half_jaccard"] == pytest.approx(1 / 4) and overall.loc[500, "split_half_jaccard"] == 1
    assert np.isnan(overall.loc[900, "split_half_jaccard"])
    layer1 = by[(by.checkpoint == 100) & (by.layer.astype(str) == "1")].iloc[0]
    assert layer1["fraction_half_a"] == 0 and layer1["fraction_half_b"] == pytest.approx(2 / 5)
    p_a = compare.persistence({s: h[0] for s, h in halves.items()})
    assert p_a.loc[100, 500] == pytest.approx(1 / 2) and np.isnan(p_a.loc[900, 900])


def cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tasks", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def store(tmp_path_factory, mini_zoo):
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(mini_zoo, store / "zoo")
    proc = cli(store, "compare", "--checkpoints", "100 300", *ARGS)
    assert proc.returncode == 0, proc.stderr
    for step in (100, 300):  # the per-checkpoint reports (the comparison reuses their analyses)
        proc = cli(store, "analyze", "--checkpoint", str(step), *ARGS)
        assert proc.returncode == 0, proc.stderr
    return store


def run_dir(store: Path, step: int) -> Path:
    return store / "results" / MODELS / f"checkpoint-{step}_n_tokens-6000"


def text_of(html: str, element_id: str) -> str:
    return re.search(rf'id="{element_id}">([^<]*)<', html).group(1)


def rows(html: str, key: str) -> dict[str, dict[str, str]]:
    """{value: {column: text}} of the first table whose rows carry data-<key>."""
    out = {}
    for row_key, body in re.findall(rf'<tr data-{key}="([^"]*)">(.*?)</tr>', html):
        out.setdefault(row_key, dict(re.findall(r'<td data-col="([^"]*)">([^<]*)</td>', body)))
    return out


def test_run_report_numbers_equal_the_csvs(store):
    d = run_dir(store, 300)
    html = (d / "report.html").read_text()
    excess = pd.read_csv(d / "excess_correlation_scores.csv")
    universal = pd.read_csv(d / "universal_neurons.csv")
    stats = pd.read_csv(d / "neuron_stats.csv")
    assert int(text_of(html, "n-universal")) == len(universal) and int(text_of(html, "n-neurons")) == len(excess)
    assert text_of(html, "fraction") == f"{len(universal) / len(excess):.2%}"
    layers = rows(html, "layer")
    for layer in (0, 1):
        assert int(layers[str(layer)]["n_universal"]) == (universal.layer == layer).sum()
    properties = rows(html, "statistic")
    keys = set(zip(universal.layer, universal.neuron))
    dead = set(zip(excess.layer[excess.dead], excess.neuron[excess.dead]))
    mask = np.array([k in keys for k in zip(stats.layer, stats.neuron)])
    rest = np.array([k not in keys and k not in dead for k in zip(stats.layer, stats.neuron)])
    contrasts = pd.read_csv(d / "universal_vs_rest.csv").set_index("statistic")
    for column in ("l2_penalty", "sparsity", "act_kurt", "vocab_kurt"):
        assert float(properties[column]["universal_median"]) == pytest.approx(stats.loc[mask, column].median(), abs=6e-4)
        assert float(properties[column]["rest_median"]) == pytest.approx(stats.loc[rest, column].median(), abs=6e-4)
        assert float(properties[column]["p_holm"]) == pytest.approx(contrasts.loc[column, "p_holm"], rel=1e-3)
    sentence = text_of(html, "contrasts-sentence")
    differ = contrasts.index[contrasts["differs"]]
    assert all(name in sentence for name in differ) and ("No statistic differs" in sentence) == (len(differ) == 0)
    cards = re.findall(r'data-neuron="(\d+)\.(\d+)"', html)
    assert [(int(l), int(n)) for l, n in cards] == list(zip(universal.layer, universal.neuron))[:20]
    shown = {name: [float(v) for v in re.findall(rf'class="{name}">([^<]*)<', html)]
             for name in ("excess", "ci-low", "ci-high", "half-a", "half-b")}
    for name, column in [("excess", "excess_correlation"), ("ci-low", "excess_ci_low"), ("ci-high", "excess_ci_high"),
                         ("half-a", "excess_half_a"), ("half-b", "excess_half_b")]:
        np.testing.assert_allclose(shown[name], universal[column].values[:len(cards)], atol=6e-4)
    record = json.loads((d / "run.json").read_text())
    assert int(text_of(html, "n-universal-half-a")) == record["n_universal_half_a"]
    assert float(text_of(html, "median-excess-se")) == pytest.approx(excess["excess_se"].median(), abs=6e-5)
    assert html.count("<mark>") == 5 * len(cards)
    assert html.count("data:image/png;base64,") == 7  # the run's plots, the ablation's and the causal checks' among them
    # the causal checks: three candidates of each kind against 19 random neurons of their layer
    checks = pd.read_csv(d / "interventions_summary.csv")
    assert list(checks["kind"]) == ["entropy"] * (checks["kind"] == "entropy").sum() + ["deactivation"] * 3
    assert (checks["kind"] == "entropy").sum() <= 3 and (checks["n_controls"] == 19).all()
    assert checks["p"].between(1 / 20, 1).all()
    steepest = np.maximum(checks["control_max"].abs(), checks["control_min"].abs())
    assert ((checks["slope"].abs() >= steepest) == (checks["p"] == 1 / 20)).all()
    sweep = pd.read_csv(d / "interventions.csv")
    for kind, group in checks.groupby("kind"):  # the unchanged model, then each swept neuron at 8 values
        assert (sweep["sweep"] == kind).sum() == 1 + (3 + 19 * group["layer"].nunique()) * 8
    assert "Causal checks" in html and f"p = {checks['p'].iloc[0]:.2g}" in text_of(html, "interventions-sentence")
    # families: the section's table is family_counts.csv, each card names its neuron's family
    counts = pd.read_csv(d / "family_counts.csv").set_index("family")
    shown_counts = rows(html, "family")
    assert set(shown_counts) == set(counts.index)
    for family, row in shown_counts.items():
        assert int(row["n_universal"]) == counts.loc[family, "n_universal"]
        assert int(row["n_all"]) == counts.loc[family, "n_all"]
    enriched = counts.loc[counts["enriched"].notna(), "enriched"]
    sentence = text_of(html, "families-sentence")
    assert sentence.startswith("No family's share differs") == enriched.empty
    assert "nan" not in sentence and all(f"{family} ({how} often" in sentence for family, how in enriched.items())
    families = pd.read_csv(d / "families.csv").set_index(["layer", "neuron"])
    assert re.findall(r'class="family-name">([^<]*)<', html) == [
        families.loc[(int(l), int(n)), "family"] for l, n in cards]
    assert html.count("data:image/svg+xml;base64,") == len(cards)  # a histogram per card
    assert "final weights" not in html and "<td data-col=\"value\">300</td>" in html


def test_report_rebuilds_from_existing_results(store, tmp_path):
    d = run_dir(store, 300)
    before = {p: p.stat().st_mtime_ns for p in d.glob("*.csv")}
    proc = cli(store, "report", "--checkpoint", "300", *ARGS, "--report-tasks", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    ran = json.loads((tmp_path / "r.json").read_text())["ran_here"]
    assert len(ran) == 1 and ran[0].startswith("RunReport")
    assert {p: p.stat().st_mtime_ns for p in d.glob("*.csv")} == before
    assert (d / "report.html").exists()


def test_compare_outputs_match_the_per_checkpoint_runs(store):
    out = store / "results" / MODELS / "compare-100-300_n_tokens-6000"
    universal = {s: pd.read_csv(run_dir(store, s) / "universal_neurons.csv") for s in (100, 300)}
    by = pd.read_csv(out / "universality_by_checkpoint.csv")
    overall = by[by.layer.astype(str) == "all"].set_index("checkpoint")
    assert overall.loc[100, "n_universal"] == len(universal[100]) and overall.loc[300, "n_universal"] == len(universal[300])
    sets = {s: set(zip(u.layer, u.neuron)) for s, u in universal.items()}
    persistence = pd.read_csv(out / "persistence.csv", index_col=0)
    expected = len(sets[100] & sets[300]) / len(sets[100]) if sets[100] else np.nan
    assert persistence.loc[100, "300"] == pytest.approx(expected, nan_ok=True)
    excess = {s: pd.read_csv(run_dir(store, s) / "excess_correlation_scores.csv") for s in (100, 300)}
    halves = {s: [set(zip(e.layer[e[c] >= 0.1], e.neuron[e[c] >= 0.1])) for c in ("excess_half_a", "excess_half_b")]
              for s, e in excess.items()}
    for s in (100, 300):
        assert overall.loc[s, "fraction_half_a"] == pytest.approx(len(halves[s][0]) / len(excess[s]), abs=1e-6)
        assert overall.loc[s, "fraction_half_b"] == pytest.approx(len(halves[s][1]) / len(excess[s]), abs=1e-6)
    for i, name in enumerate(["persistence_half_a", "persistence_half_b"]):
        table = pd.read_csv(out / f"{name}.csv", index_col=0)
        first = halves[100][i]
        expected = len(first & halves[300][i]) / len(first) if first else np.nan
        assert table.loc[100, "300"] == pytest.approx(expected, nan_ok=True)
    jaccard = pd.read_csv(out / "jaccard.csv", index_col=0)
    assert jaccard.loc[100, "300"] == pytest.approx(len(sets[100] & sets[300]) / len(sets[100] | sets[300]))
    trajectories = pd.read_csv(out / "neuron_trajectories.csv")
    assert set(zip(trajectories.layer, trajectories.neuron)) == sets[100] | sets[300]
    for name in ("universality_by_checkpoint", "persistence", "jaccard", "neuron_trajectories",
                 "excess_correlation_distributions"):
        assert (out / f"{name}.png").stat().st_size > 5000
    html = (out / "compare.html").read_text()
    assert html.count("data:image/png;base64,") == 7
    assert rows(html, "checkpoint")["300"]["n_universal"] == str(len(universal[300]))
    # the families at each step are that run's family_counts.csv (every family at every step)
    families = pd.read_csv(out / "families_by_checkpoint.csv")
    assert (out / "families_by_checkpoint.png").stat().st_size > 5000
    for s in (100, 300):
        own = pd.read_csv(run_dir(store, s) / "family_counts.csv").set_index("family")
        at_step = families[families.checkpoint == s].set_index("family")
        assert at_step["n_all"].sum() == 128 and at_step["n_universal"].sum() == len(universal[s])
        assert (at_step.loc[own.index, ["n_universal", "n_all"]] == own[["n_universal", "n_all"]]).all().all()
        assert (at_step.drop(index=own.index)["n_all"] == 0).all()
    assert "Neuron families across training" in html and 'id="families-first"' in html
    # the ablation impact per checkpoint is each run's ablation summary
    ablation = pd.read_csv(out / "ablation_by_checkpoint.csv")
    assert (out / "ablation_by_checkpoint.png").stat().st_size > 5000
    for s in (100, 300):
        summary = pd.read_csv(run_dir(store, s) / "ablation_summary.csv")
        at_step = ablation[ablation.checkpoint == s].drop(columns="checkpoint").reset_index(drop=True)
        assert list(at_step.columns) == list(summary.columns) and len(at_step) == len(summary)
        if len(summary):  # a step without universal neurons has no rows
            pd.testing.assert_frame_equal(at_step, summary, check_dtype=False)
    assert "Functional impact across training" in html
    # universal against the rest, per checkpoint: each run's table
    contrasts = pd.read_csv(out / "universal_vs_rest_by_checkpoint.csv")
    for s in (100, 300):
        own = pd.read_csv(run_dir(store, s) / "universal_vs_rest.csv")
        at_step = contrasts[contrasts.checkpoint == s].drop(columns="checkpoint").reset_index(drop=True)
        pd.testing.assert_frame_equal(at_step, own, check_dtype=False)
    assert re.search(r'<li data-checkpoint="300">step 300: (Universal neurons differ|No statistic differs)', html)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
@pytest.mark.parametrize("page", ["report", "compare"])
def test_pages_render_in_headless_chromium(store, tmp_path, page):
    path = run_dir(store, 300) / "report.html" if page == "report" else \
        store / "results" / MODELS / "compare-100-300_n_tokens-6000" / "compare.html"
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,5000",
                    f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True)
    image = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    assert image.std() > 20, "blank page"
    # The plots' blue (the run plots' #4c72b0, matplotlib's default #1f77b4 in the comparison)
    # exists only inside the embedded images.
    colour = [76, 114, 176] if page == "report" else [31, 119, 180]
    blue = (np.abs(image - colour).sum(axis=2) < 30).sum()
    assert blue > 2000, f"embedded images did not render ({blue} plot-coloured pixels)"


# Appended to a copy of a page: once it has loaded, every element reaching past the page's right
# edge, and how wide the page scrolls, written into the DOM for --dump-dom to return.
OVERFLOW_CHECK = """<script>window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll("body *")].filter(e => e.getBoundingClientRect().right > width + 0.5)
    .map(e => e.tagName + " " + Math.round(e.getBoundingClientRect().width) + " px: "
              + e.textContent.slice(0, 40));
  const out = document.createElement("pre");
  out.id = "overflow-check";
  out.textContent = JSON.stringify({width: width, scroll: document.documentElement.scrollWidth, wide: wide});
  document.body.appendChild(out);
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
@pytest.mark.parametrize("page", ["report", "compare"])
def test_no_element_is_wider_than_the_page(store, tmp_path, page):
    """At 1000 and 1400 px the 17-column ablation table and the comparison's tables ran past
    the page's edge."""
    source = run_dir(store, 300) / "report.html" if page == "report" else \
        store / "results" / MODELS / "compare-100-300_n_tokens-6000" / "compare.html"
    copy = tmp_path / "page.html"
    copy.write_text(source.read_text() + OVERFLOW_CHECK)
    for width in (1000, 1400):
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},900",
                              "--virtual-time-budget=5000", "--dump-dom", copy.as_uri()],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        found = json.loads(html_unescape(re.search(r'<pre id="overflow-check">(.*?)</pre>', dom).group(1)))
        assert found["scroll"] <= found["width"] and not found["wide"], (width, found)


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_null_control_at_initialisation(store):
    """Untrained models share no neurons: at step 0 the excess correlations scatter around
    zero and nothing reaches the threshold; the report says so. (The scatter, mean |excess|
    about 0.022 on the mini zoo, is the models' own: it does not shrink with more tokens, the
    split-half error being 0.005; the signed mean is within 0.001 of zero.)"""
    proc = cli(store, "analyze", "--checkpoint", "0", *ARGS[:2], "--n-tokens", "20000", *ARGS[4:])
    assert proc.returncode == 0, proc.stderr
    out = store / "results" / MODELS / "checkpoint-0_n_tokens-20000"
    excess = pd.read_csv(out / "excess_correlation_scores.csv")["excess_correlation"]
    assert abs(excess.mean()) < 0.01 and excess.abs().mean() < 0.03 and excess.max() < 0.1
    html = (out / "report.html").read_text()
    assert f"mean |excess correlation| is {excess.abs().mean():.3f}" in text_of(html, "null-control")
    assert "0 neurons reach the threshold 0.1" in text_of(html, "null-control")


def paper_run(**changes) -> dict:
    run = {"model_set": "stanford-gpt2-small", "reference": "stanford-crfm/alias-gpt2-small-x21",
           "checkpoint": None, "threshold": 0.5, "top_k": None, "exclude_tokens": "bos,eos,pad,newline",
           "ctx_len": 512, "dataset": "NeelNanda/pile-10k", "n_tokens": 5_000_000}
    return {**run, **changes}


def test_comparison_with_the_paper_is_gated_on_its_setup():
    published = published_reference("stanford-gpt2-small")
    table = published["table"]
    # a planted run: the paper's neurons rank first except 100 of them, swapped with others
    excess = pd.DataFrame([(l, n) for l in range(12) for n in range(3072)], columns=["layer", "neuron"])
    theirs = set(zip(table["layer"], table["neuron"]))
    excess["excess_correlation"] = [0.6 if k in theirs else 0.0 for k in zip(excess["layer"], excess["neuron"])]
    dropped = table.head(100)
    for l, n in zip(dropped["layer"], dropped["neuron"]):
        excess.loc[(excess.layer == l) & (excess.neuron == n), "excess_correlation"] = 0.1
    others = excess[excess["excess_correlation"] == 0].head(100).index
    excess.loc[others, "excess_correlation"] = 0.7
    assert rank_recall(excess, table) == pytest.approx((len(table) - 100) / len(table))
    universal = excess[excess["excess_correlation"] >= 0.5]

    html = paper_comparison_html(paper_run(), excess, universal)
    assert text_of(html, "published-fraction") == "4.16%" and int(text_of(html, "overlap")) == len(table) - 100
    assert "not-comparable" not in html
    for change, why in [({"checkpoint": 20000}, "training step 20000"), ({"threshold": 0.3}, "threshold is 0.3"),
                        ({"top_k": 50}, "top 50"), ({"exclude_tokens": "bos"}, "excludes"),
                        ({"ctx_len": 64}, "contexts are 64"), ({"dataset": "python-stdlib"}, "the Pile"),
                        ({"n_tokens": 100_000}, "100,000 tokens")]:
        html = paper_comparison_html(paper_run(**change), excess, universal)
        assert "not comparable" in html and why in html and "published-fraction" not in html, change
        assert 'id="overlap"' not in html and text_of(html, "rank-recall") == f"{(len(table) - 100) / len(table):.1%}"
    html = paper_comparison_html(paper_run(reference="stanford-crfm/battlestar-gpt2-small-x49"), excess, universal)
    assert "rank-recall" not in html and 'id="overlap"' not in html  # the paper scored seed a only
    assert "No published figures" in paper_comparison_html(paper_run(model_set="toy-zoo"), excess, universal)


def test_activation_histogram_bars_are_log_counts():
    svg = activation_histogram_svg([0.0] * 100 + [1.0] * 10, "L0.1 activations", bins=4)
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([0-9.]+)"', svg)]
    assert len(heights) == 2  # two bins hold tokens
    assert heights[0] / heights[1] == pytest.approx(math.log10(100) / math.log10(10), rel=1e-3)
    assert "<title>L0.1 activations</title>" in svg and ">0<" in svg and ">1<" in svg
