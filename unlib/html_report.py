"""The self-contained HTML reports: a run's (report.html) and the comparison across
checkpoints (compare.html), images embedded as data URIs."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from unlib.ablation import few_documents_warning
from unlib.compare import first_above_chance
from unlib.contrasts import differences_sentence
from unlib.paper_reference import paper_setup_differences, published_reference, rank_recall
from unlib.plots import value_range
from unlib.tokens import HELD_OUT_SPREAD

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
.warning { color: #a40; font-weight: 600; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
td { white-space: nowrap; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
img { max-width: 100%; box-sizing: border-box; border: 1px solid #eee; margin: .4em 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .6em 1em; }
.card h3 { margin: .2em 0; } .ctx { font-family: monospace; font-size: .85em; white-space: pre-wrap; margin: .15em 0; }
.ctx mark { background: #ffd54f; font-weight: bold; }
.card table { font-size: .8em; width: 100%; } .card td, .card th { padding: .15em .3em; } .tok { font-family: monospace; background: #eef; padding: 0 .2em; }
.big { font-size: 1.4em; font-weight: bold; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def image_tag(png: bytes | Path, alt: str) -> str:
    data = png.read_bytes() if isinstance(png, Path) else png
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def svg_tag(svg: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()}">'


def table_html(df: pd.DataFrame, float_format: str = "{:.3f}", key: str | None = None) -> str:
    """A plain HTML table; with `key`, each row carries data-<key>="<its value in that column>"
    so scripts and tests can find it."""
    # a long column name may wrap after its underscores, so wide tables fit the page
    head = "".join(f"<th>{esc(c).replace('_', '_<wbr>')}</th>" for c in df.columns)
    rows = []
    for _, row in df.astype(object).iterrows():  # object dtype keeps integers integers
        cells = "".join(f'<td data-col="{esc(c)}">{esc(_cell(v, float_format))}</td>' for c, v in row.items())
        attr = f' data-{esc(key)}="{esc(row[key])}"' if key else ""
        rows.append(f"<tr{attr}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def by_measure(summary: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """An ablation summary (one row per scope or checkpoint, 17 columns) as two rows each, one
    per measure (loss change, KL): the universal set's value, the random sets' mean and 5-95 %
    range, z and p; narrow enough for the page."""
    rows = []
    for row in summary.to_dict("records"):  # integers stay integers
        for metric, label in (("delta_loss", "Δloss"), ("kl", "KL")):
            rows.append({**{k: row[k] for k in keys}, "measure": label, "universal": row[f"universal_{metric}"],
                         "random_mean": row[f"random_{metric}_mean"],
                         "random_5-95 %": f"{_g(row[f'random_{metric}_q05'])} to {_g(row[f'random_{metric}_q95'])}",
                         "z": row.get(f"{metric}_z", np.nan), "p": row[f"{metric}_p"]})
    return pd.DataFrame(rows)


def _cell(value, float_format: str) -> str:
    if isinstance(value, float):
        return "—" if np.isnan(value) else float_format.format(value)
    return str(value)


def paper_comparison_html(run: dict, excess: pd.DataFrame, universal: pd.DataFrame) -> str:
    """The report's comparison with the paper: the published fraction and the overlap of the
    universal sets where the run matches the paper's setup, "not comparable" and why where it
    does not, and the rank recall whenever the reference model is the one the paper scored."""
    published = published_reference(run["model_set"])
    if not published:
        return "<p>No published figures exist for this model set.</p>"
    source = f"Gurnee et al. 2024, {esc(published['model'])}, {esc(published['file'])}"
    recall = ""
    if run["reference"] == published["model"]:
        value = rank_recall(excess, published["table"])
        recall = (f'<p>Rank recall: <span id="rank-recall">{value:.1%}</span> of the {published["n_universal"]} '
                  f"neurons the paper found universal are among this run's {published['n_universal']} highest "
                  f"excess correlations (chance: {published['n_universal'] / published['n_neurons']:.1%}).</p>")
    reasons = paper_setup_differences(run, published)
    if reasons:
        return (f'<p id="not-comparable">Published universal fraction and overlap ({source}): not comparable, '
                f"because {'; '.join(esc(r) for r in reasons)}.</p>{recall}")
    overlap = ""
    if recall:
        ours = set(zip(universal["layer"], universal["neuron"]))
        theirs = set(zip(published["table"]["layer"], published["table"]["neuron"]))
        both = len(ours & theirs)
        overlap = (f'<p>Overlap with the published universal set: <span id="overlap">{both}</span> neurons '
                   f"({both / max(len(theirs), 1):.1%} of theirs, {both / max(len(ours), 1):.1%} of ours).</p>")
    return (f'<p>Published ({source}): <span id="published-fraction">{published["fraction"]:.2%}</span> universal '
            f'({published["n_universal"]} of {published["n_neurons"]}).</p>{overlap}{recall}')


def dead_html(run: dict) -> str:
    """How many of the reference model's neurons are dead: constant over the analysed tokens."""
    if run.get("n_dead") is None:  # a run recorded before dead neurons were counted
        return ""
    return (f'<p>Dead neurons: <span id="n-dead">{run["n_dead"]}</span> of the reference model\'s neurons are '
            f"constant over the analysed tokens. Their correlations, baselines and excess correlation are 0, "
            f"no best match is claimed for them (<code>max_layer</code> and <code>max_neuron</code> are -1) and "
            f"they are never selected as universal; <code>dead</code> marks them in "
            f"<code>excess_correlation_scores.csv</code>.</p>")


def null_control_html(run: dict, excess: pd.DataFrame) -> str:
    """At random initialisation (step 0) no neuron can be universal: the report says so and
    shows how close to zero the run's excess correlations are."""
    if run.get("checkpoint") != 0:
        return ""
    values = excess["excess_correlation"]
    above = int((values >= run["threshold"]).sum())
    return (f'<p id="null-control">Null control: at step 0 the models are untrained, so no neuron should be '
            f"universal. Here the mean |excess correlation| is {values.abs().mean():.3f}, the largest "
            f"{values.max():.3f}, and {above} neurons reach the threshold {run['threshold']}.</p>")


def _g(value: float) -> str:
    """An ablation figure as the report shows it (4 significant digits)."""
    return "—" if value is None or np.isnan(value) else f"{value:.4g}"


def _harm(p: float, n_random: int) -> str:
    """In words, how the universal set's harm ranks among the random sets' (p: the
    permutation p-value, (1 + sets at least as harmful) / (1 + sets))."""
    if p <= 1 / (1 + n_random) + 1e-12:
        return (f"more harmful than every one of the {n_random} random sets (p = {p:.3g}, the smallest "
                f"{n_random} sets can give)")
    if p <= 0.05:
        return f"more harmful than random neurons (p = {p:.3g})"
    return f"not clearly more harmful than random neurons (p = {p:.2g})"


def ablation_html(run: dict, ablation: dict | None) -> str:
    """The report's ablation section: what ablating the universal set does to the reference
    model's predictions on held-out tokens, against matched random sets (the CSVs' numbers);
    with TOP_K (no ablation run) or no universal neuron, why there is none."""
    if ablation is None:
        return ('<p id="ablation-not-run">Not measured: with <code>TOP_K</code> the selected neurons are the k highest '
                "excess correlations, however low, not the universal set a threshold defines, so their ablation "
                "says nothing about universal neurons. Run with <code>THRESHOLD</code> to measure it (from Python, "
                "<code>unlib.ablation.ablate</code> ablates any set).</p>")
    table, summary = ablation["table"], ablation["summary"]
    if summary.empty:
        return '<p id="ablation-empty">No universal neurons at this threshold: nothing to ablate.</p>'
    base = float(table.loc[table["condition"] == "none", "loss"].iloc[0])
    how = ("replaced by its mean over the analysed tokens" if run.get("ablation", "mean") == "mean"
           else "set to 0")
    documents = run.get("ablation_documents")
    held_out = (f'<span id="ablation-tokens">{run.get("ablation_tokens")}</span> held-out tokens (from '
                f'<span id="ablation-documents">{documents if documents is not None else "—"}</span> documents after '
                f"the analysed ones, each giving at most 1/{HELD_OUT_SPREAD} of them or one sequence, with the same "
                f"exclusions)")
    warning = few_documents_warning(run.get("ablation_tokens") or 0, documents)
    few = f'<p class="warning" id="ablation-few-documents">Warning: {esc(warning)}.</p>' if warning else ""
    overall = summary[summary["scope"] == "all"].iloc[0]
    n_random = int(overall["n_random"])
    control = run.get("ablation_control", "layer")
    matched = ", each neuron from the activation-frequency decile of a universal one" if control == "matched" else ""
    sentence = (
        f'<p id="ablation-sentence">Ablating the <span id="ablation-n-neurons">{int(overall["n_neurons"])}</span> '
        f"universal neurons (each post-activation {how}) changes the reference model's loss on the {held_out} by "
        f'<span id="ablation-universal-delta-loss">{_g(overall["universal_delta_loss"])}</span> nats (from '
        f'<span id="ablation-loss">{_g(base)}</span>), and its next-token distribution by a KL divergence of '
        f'<span id="ablation-universal-kl">{_g(overall["universal_kl"])}</span> nats per token. '
        f"{n_random} random sets with as many neurons in each layer{matched} change the loss by "
        f'<span id="ablation-random-delta-loss-mean">{_g(overall["random_delta_loss_mean"])}</span> on average '
        f'(5-95 %: <span id="ablation-random-delta-loss-q05">{_g(overall["random_delta_loss_q05"])}</span> to '
        f'<span id="ablation-random-delta-loss-q95">{_g(overall["random_delta_loss_q95"])}</span>) and the '
        f'distribution by a KL of <span id="ablation-random-kl-mean">{_g(overall["random_kl_mean"])}</span> '
        f'(5-95 %: <span id="ablation-random-kl-q05">{_g(overall["random_kl_q05"])}</span> to '
        f'<span id="ablation-random-kl-q95">{_g(overall["random_kl_q95"])}</span>). So, by the loss, the universal '
        f'neurons are {_harm(overall["delta_loss_p"], n_random)} (z = {_g(overall["delta_loss_z"])}); by the KL, '
        f'{_harm(overall["kl_p"], n_random)} (z = {_g(overall["kl_z"])}).</p>')
    layers = summary[summary["scope"] != "all"]
    if len(layers):
        stronger = [s.removeprefix("layer ") for s, p in zip(layers["scope"], layers["delta_loss_p"]) if p <= 0.05]
        weaker = [s.removeprefix("layer ") for s, p in zip(layers["scope"], layers["delta_loss_p"]) if p > 0.05]
        most = layers.loc[layers["universal_delta_loss"].idxmax()]
        not_in = f" and not in layer(s) {', '.join(weaker)}" if weaker else ""
        sentence += (f"<p>Layer by layer, the universal neurons raise the loss more than the random sets' parts in "
                     f"that layer (p ≤ 0.05, not corrected across layers) in layer(s) {', '.join(stronger) or 'none'}"
                     f"{not_in}; ablating those of "
                     f"{esc(most['scope'])} alone changes the loss most ({_g(most['universal_delta_loss'])} nats).</p>")
    how_drawn = ("each universal neuron paired with a live neuron of its layer outside the universal set, drawn "
                 "from its own activation-frequency decile (the nearest decile with one left, where its own has none; "
                 "dead neurons only when no live one is left)" if control == "matched" else
                 "drawn uniformly from each layer's neurons outside the universal set")
    seed = (f"<p>Random sets (<code>ABLATION_CONTROL={control}</code>): {how_drawn}; set k from the generator seeded "
            f"({run.get('ablation_seed')}, k). <code>p</code>: (1 + the random sets at least as harmful) / (1 + the "
            f"random sets), the permutation test's p-value; <code>z</code>: (universal − random mean) / random "
            f"standard deviation.</p>")
    neurons = ablation.get("neurons")
    alone = ("" if neurons is None or neurons.empty else
             f"<p>Each universal neuron ablated alone (<code>ablation_neurons.csv</code>), the ten that change the "
             f"loss most:</p>{table_html(neurons.head(10), '{:.4g}')}")
    return (few + sentence + table_html(by_measure(summary, ["scope", "n_neurons"]), "{:.4g}", key="scope") + seed
            + alone
            + image_tag(ablation["plot"], "ablation_impact"))


def halves_text(split: dict) -> str:
    """How the tokens were split into halves, in words (run.json's split_halves)."""
    rows = " and ".join(f"{n:,}" for n in split["half_rows"])
    if "documents" not in split:
        return f"{split['rule']}: {rows} tokens"
    cut = split["cut_documents"]
    shared = (f"; {cut} document{'s' if cut != 1 else ''} longer than a quarter of the tokens cut into pieces, "
              f"which may fall in both halves" if cut else "")
    a, b = split["half_documents"]
    return f"whole documents: {a} and {b} of {split['documents']}, {rows} tokens{shared}"


def families_html(run: dict, counts: pd.DataFrame) -> str:
    """The report's families section: what each family means, the cuts this run's model got,
    and each family's count among the universal neurons and the rest, tested."""
    r = run.get("families", {})
    drop = r.get("null_space_drop_ratio")
    null_space = (f"{r['null_space_k']} bottom singular directions (spectrum drop ×{drop:.3g})" if r.get("null_space_k")
                  else f"none (the spectrum's largest drop, ×{drop:.3g}, is below ×2)" if drop else "none")
    differ = counts[counts["enriched"] != ""]
    sentence = ("No family's share differs between universal neurons and the rest (two-sided Fisher exact test, "
                "Holm-corrected)." if differ.empty else
                "Universal neurons differ from the rest (two-sided Fisher exact test, Holm p &lt; 0.05) in: " +
                "; ".join(f"{esc(row.family)} ({row.enriched} often: {row.n_universal} of the universal, "
                          f"{row.share_all:.1%} of all)" for row in differ.itertuples()) + ".")
    return (f"<p>Each neuron has one family: its role from its weights where it has one (entropy, attention "
            f"deactivation, prediction, suppression, partition, in that order), else the family of the token "
            f"feature that explains most of its activation variance (variance reduction ≥ "
            f"{r.get('explained_vr', 0.05):g}), else unexplained. This model: {r.get('n_features', '?')} features over "
            f"{esc(r.get('vocabulary', ''))}; unembedding null space: {esc(null_space)}, where an entropy neuron "
            f"writes at least {r.get('entropy_null_fraction', 0.5):.2f} of |w_out|; "
            f"attention deactivation beyond z = {r.get('deactivation_z', float('nan')):.2f} over "
            f"{r.get('deactivation_pairs', 0):,} neuron–head pairs; partition above vocab_var "
            f"{r.get('partition_var', float('nan')):.4f}. Definitions: docs/method.md, \"Neuron families\".</p>"
            f'<p id="families-sentence">{sentence}</p>' + table_html(counts, "{:.4g}", key="family"))


def interventions_html(interventions: dict | None) -> str:
    """The causal checks: what was swept, the summary table and its figure."""
    if interventions is None:
        return "<p>Not run with TOP_K (they read the ablation's held-out tokens).</p>"
    summary = interventions["summary"]
    if summary.empty:
        return ("<p>No candidate to check: the unembedding has no null space and no neuron meets the paper's "
                "entropy query, and no head comes after an MLP layer.</p>")
    shown = pd.DataFrame({"candidate": [f"L{r.layer}.{r.neuron}" for r in summary.itertuples()],
                          "kind": summary["kind"], "role": summary["role"].fillna(""),
                          "head": [f"{r.head_layer}.{r.head}" if r.head >= 0 else "" for r in summary.itertuples()],
                          "slope": summary["slope"], "random_min": summary["control_min"],
                          "random_max": summary["control_max"], "p": summary["p"]})
    said = "; ".join(f"L{r.layer}.{r.neuron} ({r.kind}{f', head {r.head_layer}.{r.head}' if r.head >= 0 else ''}): "
                     f"slope {r.slope:.3g} against {r.control_min:.3g} to {r.control_max:.3g}, p = {r.p:.2g}"
                     for r in summary.itertuples())
    return (f"<p>On the first held-out tokens, each candidate's post-activation is fixed at every position to each "
            f"value of the paper's sweep (−0.17, 0, 1, …, 6), and so is that of {int(summary['n_controls'].max())} "
            f"random neurons of its layer: the slope of the next-token entropy (entropy candidates: the highest null "
            f"fractions) or of its head's attention to BOS (deactivation candidates: the highest z) against the "
            f"fixed value, beside the random neurons' slopes; p = (1 + k) / (1 + n) for k of the n random neurons "
            f"with a slope at least as steep (absolute value).</p><p id=\"interventions-sentence\">{esc(said)}.</p>"
            + table_html(shown, "{:.3g}", key="candidate") + image_tag(interventions["plot"], "interventions"))


def _explained(card: dict) -> str:
    if "best_feature" not in card:
        return ""
    return (f' · best feature <span class="best-feature">{esc(card["best_feature"])}</span> '
            f'(variance reduction {card["best_vr"]:.2f})')


def _card_html(card: dict) -> str:
    visible = lambda text: esc(text.replace("\n", "⏎").replace("\t", "⇥"))  # noqa: E731
    contexts = "".join(f'<div class="ctx">{visible(c["before"])}<mark>{visible(c["token"])}</mark>'
                       f'{visible(c["after"])}  <small>({c["activation"]:.2f})</small></div>' for c in card["contexts"])
    tokens = lambda items: " ".join(f'<span class="tok">{esc(repr(t)[1:-1])}</span>' for t in items)  # noqa: E731
    number = lambda value: _cell(value, "{:.3f}")  # noqa: E731
    (low, high), (half_a, half_b) = card["ci"], card["halves"]
    return (f'<div class="card" data-neuron="{card["layer"]}.{card["neuron"]}">'
            f'<h3>L{card["layer"]}.{card["neuron"]} <small>excess <span class="excess">{card["excess"]:.3f}</span>'
            f' (95 % interval <span class="ci-low">{number(low)}</span> to <span class="ci-high">{number(high)}</span>;'
            f' half A <span class="half-a">{number(half_a)}</span>, half B <span class="half-b">{number(half_b)}</span>)'
            f'</small></h3>'
            f'<p class="family"><b>Family</b> <span class="family-name">{esc(card.get("family", "—"))}</span>'
            f'{_explained(card)}</p>'
            f'{table_html(card["matches"], key="other_model")}{svg_tag(card["histogram"], "activation histogram")}'
            f"<p><b>Top-activating contexts</b></p>{contexts}"
            f"<p><b>Promotes</b> {tokens(card['promoted'])}<br><b>Suppresses</b> {tokens(card['suppressed'])}</p></div>")


def run_report_html(run: dict, excess: pd.DataFrame, contrasts: pd.DataFrame, universal: pd.DataFrame,
                    layer_summary: pd.DataFrame, plots: dict[str, Path], cards: list[dict],
                    ablation: dict | None, family_counts: pd.DataFrame, interventions: dict | None) -> str:
    """The self-contained per-run report (images embedded as data URIs); `contrasts`:
    universal_vs_rest.csv; `ablation`: the run's ablation table, summary and plot ({"table",
    "summary", "plot"}), None when not run (TOP_K); `family_counts`: family_counts.csv;
    `interventions`: the causal checks' summary and plot ({"summary", "plot"}), None with TOP_K."""
    n_neurons, n_universal = len(excess), len(universal)
    shown = {"checkpoint": run.get("checkpoint") if run.get("checkpoint") is not None else "final weights",
             "top_k": run.get("top_k") if run.get("top_k") is not None else "none (threshold)"}
    if "positions" in run:
        p = run["positions"]
        shown["positions"] = (f"{p['positions']:,} in {p['n_sequences']:,} sequences: {p['analysed_tokens']:,} analysed; "
                              f"dropped {p['dropped_bos_column']:,} BOS, {p['dropped_excluded']:,} excluded tokens, "
                              f"{p['dropped_past_budget']:,} past the budget")
    if isinstance(run.get("precision"), dict):
        p = run["precision"]
        shown["precision"] = f"{p['mode']} ({p['chosen']}; documented error {p['documented_error']:g} of float64)"
    keys = ("model_set", "models", "reference", "checkpoint", "dataset", "dataset_id", "document_seed", "n_tokens",
            "ctx_len", "exclude_tokens", "exclude_ids", "positions", "rotations", "rotation_seed", "threshold", "top_k",
            "ablation", "ablation_tokens", "ablation_documents", "ablation_samples", "ablation_control", "ablation_seed", "device",
            "precision", "correlation_seconds",
            "finished")
    params = pd.DataFrame([(k, shown.get(k, run[k])) for k in keys if k in run], columns=["parameter", "value"])
    params["value"] = params["value"].map(lambda v: ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    published = published_reference(run["model_set"])
    comparable = published is not None and not paper_setup_differences(run, published)
    jaccard = run["split_half_jaccard"]  # None when neither half selects a neuron
    stability = (f'<p>Split-half stability: the universal sets selected by the same rule on each half of the tokens '
                 f'({esc(halves_text(run["split_halves"]))}) hold '
                 f'<span id="n-universal-half-a">{run["n_universal_half_a"]}</span> and '
                 f'<span id="n-universal-half-b">{run["n_universal_half_b"]}</span> neurons; their Jaccard overlap '
                 f'is <span id="split-half-jaccard">{"—" if jaccard is None else f"{jaccard:.3f}"}</span>. '
                 f"Median standard error of a neuron's excess correlation: "
                 f'<span id="median-excess-se">{_cell(float(excess["excess_se"].median()), "{:.4f}")}</span> '
                 f"(the cards give each neuron's 95 % interval).</p>")
    summary = layer_summary.assign(fraction=layer_summary["fraction"].map(lambda f: f"{f:.2%}"))
    if comparable:
        summary["published"] = summary["layer"].map(published["per_layer"]).fillna(0).astype(int)
    figures = "".join(image_tag(path, name) for name, path in plots.items())
    properties = (f'<p id="contrasts-sentence">{esc(differences_sentence(contrasts))}</p>'
                  + table_html(contrasts, "{:.4g}", key="statistic"))
    cards_html = "".join(_card_html(c) for c in cards) or "<p>No universal neurons at this threshold.</p>"
    # the fraction depends on the cut: said beside it, so that it is not read against another's
    selection = (f"as the {run['top_k']} highest excess correlations (TOP_K)" if run.get("top_k") is not None
                 else f"at excess correlation ≥ {run['threshold']:g}")
    title = f"Universal neurons: {run['model_set']} {run.get('run_name', '')}"
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{esc(title)}</h1>
<h2>Summary</h2>
<p class="big"><span id="n-universal">{n_universal}</span> of <span id="n-neurons">{n_neurons}</span> neurons
universal (<span id="fraction">{n_universal / max(n_neurons, 1):.2%}</span>) <span id="selection">{esc(selection)}</span></p>
{stability}
{dead_html(run)}
{null_control_html(run, excess)}
{paper_comparison_html(run, excess, universal)}
{table_html(summary, key="layer")}
<h2>Parameters and provenance</h2>{table_html(params, key="parameter")}
<h2>Figures</h2>{figures}
<h2>Functional impact: ablation against matched random neurons</h2>
{ablation_html(run, ablation)}
<h2>Universal neurons against the rest</h2>
<p>Each statistic (definitions in the README) over the universal neurons and over the other live neurons (dead
ones left out): medians, Cliff's delta (P(universal &gt; rest) − P(universal &lt; rest)), the two-sided
Mann-Whitney U test's p-value and Holm's correction across the statistics.</p>{properties}
<h2>Neuron families</h2>
{families_html(run, family_counts)}
<h3>Causal checks</h3>
{interventions_html(interventions)}
<h2>Top universal neurons</h2><div class="cards">{cards_html}</div>
</body></html>"""


def range_matrix(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Cell by cell, the range ('low–high') of two matrices of the same shape."""
    cells = [[value_range(x, y) for x, y in zip(row_a, row_b)] for row_a, row_b in zip(a.values, b.values)]
    return pd.DataFrame(cells, index=a.index, columns=a.columns)


def compare_report_html(model_set: str, steps: list[int], by_checkpoint: pd.DataFrame, persistence: pd.DataFrame,
                        jaccard: pd.DataFrame, trajectories: pd.DataFrame, plots: dict[str, Path],
                        persistence_halves: tuple[pd.DataFrame, pd.DataFrame], contrasts: pd.DataFrame,
                        ablation: pd.DataFrame | None, families: pd.DataFrame) -> str:
    """The self-contained report across checkpoints; `contrasts`: each checkpoint's
    universal_vs_rest.csv (a `checkpoint` column first); `ablation`: the universal set's
    ablation impact per checkpoint (compare.ablation_by_checkpoint), None when not run (TOP_K)."""
    overall = by_checkpoint[by_checkpoint["layer"].astype(str) == "all"]
    figures = "".join(image_tag(path, name) for name, path in plots.items())
    matrix = lambda m: table_html(m.reset_index().rename(columns=str), "{:.3f}", key=m.index.name)  # noqa: E731
    title = f"Universal neurons across training: {model_set}, steps {', '.join(map(str, steps))}"
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{esc(title)}</h1>
<h2>Universality by checkpoint</h2>{table_html(overall.drop(columns="layer"), "{:.4f}", key="checkpoint")}
<p><code>fraction_half_a</code>, <code>fraction_half_b</code>: the fraction universal when selected on each half
of the tokens; <code>split_half_jaccard</code>: the overlap of those two sets.</p>
<h2>Persistence</h2><p>Fraction of the neurons universal at the row's step still universal at the column's step.</p>
{matrix(persistence)}
<p>The same computed on the universal sets selected on each half of the tokens (half A, half B): their range.</p>
{matrix(range_matrix(*persistence_halves))}
<h2>Jaccard overlap of universal sets</h2>{matrix(jaccard)}
<h2>Functional impact across training</h2>{ablation_by_checkpoint_html(steps, ablation)}
<h2>Neuron families across training</h2>{families_by_checkpoint_html(families)}
<h2>Universal neurons against the rest, by checkpoint</h2>{contrasts_by_checkpoint_html(contrasts)}
<h2>Figures</h2>{figures}
<h2>Neurons universal at any checkpoint</h2><p>{len(trajectories)} neurons; the top 30 by excess correlation at the last step:</p>
{table_html(trajectories.head(30), "{:.3f}")}
</body></html>"""


def families_by_checkpoint_html(table: pd.DataFrame) -> str:
    """The comparison's families section: per family and step, universal neurons / all neurons
    of the family, and the first step at which universal neurons hold it more often than the rest."""
    cells = table.assign(cell=table["n_universal"].astype(str) + " / " + table["n_all"].astype(str)
                         + np.where(table["enriched"] == "more", " ▲", np.where(table["enriched"] == "fewer", " ▼", "")))
    grid = cells.pivot(index="family", columns="checkpoint", values="cell").reindex(
        list(dict.fromkeys(table["family"]))).reset_index().rename(columns=str)
    first = first_above_chance(table)
    said = "; ".join(f"{esc(f)} at step {s}" for f, s in first.items() if s is not None)
    sentence = (f"Universal neurons first hold a family more often than the rest: {said}." if said else
                "At no step do universal neurons hold any family more often than the rest.")
    return (f"<p>Each cell: the family's universal neurons / all its neurons at that step; ▲ (▼) where universal "
            f"neurons hold it more (less) often than the rest (two-sided Fisher exact test, Holm-corrected "
            f"across families at each step).</p><p id=\"families-first\">{sentence}</p>"
            + table_html(grid, key="family"))


def contrasts_by_checkpoint_html(contrasts: pd.DataFrame) -> str:
    """Per checkpoint, the statistics in which the universal neurons differ from the rest
    (Holm-corrected within the checkpoint), then every test."""
    sentences = "".join(f'<li data-checkpoint="{int(step)}">step {int(step)}: '
                        f"{esc(differences_sentence(group))}</li>"
                        for step, group in contrasts.groupby("checkpoint", sort=True))
    return (f'<ul id="contrasts-by-checkpoint">{sentences}</ul>'
            + table_html(contrasts[["checkpoint", "statistic", "universal_median", "rest_median", "cliffs_delta",
                                    "p_holm", "differs"]], "{:.4g}"))


def ablation_by_checkpoint_html(steps: list[int], ablation: pd.DataFrame | None) -> str:
    """The comparison's ablation section: per checkpoint, the universal set's loss change and KL
    against the matched random sets' (all layers; the CSV and figure have every layer)."""
    if ablation is None:
        return ('<p id="ablation-not-run">Not measured: with <code>TOP_K</code> the selected neurons are not a '
                "universal set defined by a threshold (see a run's report).</p>")
    overall = ablation[ablation["scope"] == "all"]
    empty = [str(s) for s in steps if s not in set(overall["checkpoint"])]
    missing = f" No universal neurons, nothing to ablate, at step(s) {', '.join(empty)}." if empty else ""
    if overall.empty:
        return f'<p id="ablation-empty">{missing.strip()}</p>'
    last = overall.iloc[-1]
    sentence = (f'<p id="ablation-sentence">At step {int(last["checkpoint"])}, ablating the '
                f'{int(last["n_neurons"])} universal neurons changes the loss on held-out tokens by '
                f'{_g(last["universal_delta_loss"])} nats against {_g(last["random_delta_loss_mean"])} for matched '
                f'random sets (5-95 %: {_g(last["random_delta_loss_q05"])} to {_g(last["random_delta_loss_q95"])}); '
                f"the table gives every checkpoint, all layers together (<code>ablation_by_checkpoint.csv</code> "
                f"has each layer).{missing}</p>")
    return sentence + table_html(by_measure(overall, ["checkpoint", "n_neurons"]), "{:.4g}", key="checkpoint")
