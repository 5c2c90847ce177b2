"""make readme-figures: run the default analysis (and its layer-matched ablation control, and
the comparison across training) on this machine, cold, in a fresh store (the zoo trained
again), and rewrite the README's "What the default analysis finds" from their files, labelled
with this machine and the date (about 10 minutes on 2 cores).

    python -m bench.readme_figures [--check]

--check prints the section instead of writing it into README.md."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from unlib import compare
from unlib.families import read_counts

REPO = Path(__file__).resolve().parent.parent

BEGIN, END = "<!-- readme-figures: begin (make readme-figures writes this section) -->", "<!-- readme-figures: end -->"
STEP, STEPS = 1000, (250, 500, 1000)


def machine() -> str:
    """This machine in words: its CPU model and cores (and GPU, where torch sees one)."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def run(store: Path, *args: str) -> float:
    """`python -m tasks <args>` on `store`; its wall time in seconds."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "tasks", *args, "--scheduler", "local"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "UNLIB_STORE": str(store)})
    return time.monotonic() - start


def g(value: float, digits: int = 2) -> str:
    """A figure with `digits` significant digits, as the README writes it."""
    return f"{value:.{digits}g}"


def p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.0e}".replace("e-0", "e-")


def contrasts_text(contrasts: pd.DataFrame, n_rest: int) -> str:
    """The universal-vs-rest sentence: what differs after Holm's correction, and what does not."""
    rows = contrasts.sort_values("cliffs_delta", key=abs, ascending=False)
    differ = [f"{r.statistic} (median {g(r.universal_median, 3)} against {g(r.rest_median, 3)}, Cliff's delta "
              f"{r.cliffs_delta:+.2f}, p = {p_text(r.p_holm)})" for r in rows.itertuples() if r.differs]
    same = [f"{r.statistic} ({r.cliffs_delta:+.2f})" for r in rows.itertuples() if not r.differs]
    text = (f"Against the other {n_rest} live neurons (two-sided Mann-Whitney U tests, Holm-corrected across the "
            f"{len(contrasts)} statistics, in `universal_vs_rest.csv`), universal neurons differ in ")
    text += ", ".join(differ) if differ else "no statistic"
    return text + (f"; not after the correction in {', '.join(same)}." if same else ".")


def ablation_text(summary: pd.DataFrame, layer_control: pd.DataFrame, run_record: dict) -> str:
    """The ablation sentences: the universal set against matched random sets, layer by layer,
    and against sets matched on layer only."""
    if summary.empty:
        return "Nothing is universal, so nothing is ablated."
    every = summary.set_index("scope").loc["all"]
    text = (f"Ablating them (mean ablation, {run_record['ablation_tokens']:,} held-out tokens from "
            f"{run_record['ablation_documents']} documents after the analysed ones) changes the loss by "
            f"{g(every.universal_delta_loss)} nats, against {g(every.random_delta_loss_mean)} for "
            f"{int(every.n_random)} random sets matched per layer and activation-frequency decile (5-95 %: "
            f"{g(every.random_delta_loss_q05)} to {g(every.random_delta_loss_q95)}; permutation p = "
            f"{every.delta_loss_p:.2g}), and moves the predictions by KL {g(every.universal_kl)} against "
            f"{g(every.random_kl_mean)} (p = {every.kl_p:.2g}; {1 / (1 + every.n_random):.2g} is the smallest "
            f"{int(every.n_random)} sets can give)")
    layers = [r for r in summary.itertuples() if r.scope.startswith("layer ")]
    if len(layers) > 1:
        text += "; by layer, the loss change: " + ", ".join(
            f"{r.scope} ({r.n_neurons} neuron{'s' if r.n_neurons != 1 else ''}) {g(r.universal_delta_loss)} "
            f"(p = {r.delta_loss_p:.2g})" for r in layers)
    text += "."
    if not layer_control.empty:
        other = layer_control.set_index("scope").loc["all"]
        text += (f" With random sets matched on layer only (`ABLATION_CONTROL=layer`), they change the loss by "
                 f"{g(other.random_delta_loss_mean)} on average and p = {other.delta_loss_p:.2g} (KL: "
                 f"{other.kl_p:.2g}).")
    return text


def families_text(counts: pd.DataFrame, record: dict) -> str:
    """The sentence on neuron families (family_counts.csv)."""
    among = lambda column: ", ".join(f"{int(row[column])} {row['family']}" for _, row in  # noqa: E731
                                     counts[counts[column] > 0].sort_values(column, ascending=False).iterrows())
    differ = counts[counts["enriched"] != ""]
    verdict = ("no family's share differs between them" if differ.empty else "universal neurons differ in " +
               ", ".join(f"{r.family} ({r.enriched}, p = {r.p_holm:.2g})" for r in differ.itertuples()))
    return (f"Their [families](docs/method.md#neuron-families) (`family_counts.csv`): {among('n_universal')} "
            f"among the {record['n_universal']} universal neurons; {among('n_all')} among all "
            f"{record['n_neurons']}; {verdict} (two-sided Fisher exact tests, Holm-corrected).")


def compare_text(folder: Path, seconds: float) -> str:
    """The sentences across training (make compare)."""
    by_step = pd.read_csv(folder / "universality_by_checkpoint.csv")
    overall = by_step[by_step["layer"].astype(str) == "all"]
    counts = ", ".join(str(int(n)) for n in overall["n_universal"])
    steps = ", ".join(str(int(s)) for s in overall["checkpoint"])
    text = f"Across training, {counts} neurons are universal at steps {steps} (split-half Jaccard " + \
        ", ".join(f"{j:.2f}" for j in overall["split_half_jaccard"]) + ")"
    ablation_path = folder / "ablation_by_checkpoint.csv"
    if ablation_path.exists():
        ablation = pd.read_csv(ablation_path)
        every = ablation[ablation["scope"] == "all"]
        text += ("; the ablation's loss change has p = " + ", ".join(f"{p:.2g}" for p in every["delta_loss_p"])
                 + " and its KL p = " + ", ".join(f"{p:.2g}" for p in every["kl_p"]))
    contrasts = pd.read_csv(folder / "universal_vs_rest_by_checkpoint.csv")
    always = [s for s, group in contrasts.groupby("statistic", sort=False) if group["differs"].all()]
    text += (f"; at every step universal neurons differ from the rest in {', '.join(always)}" if always
             else "; no statistic differs from the rest at every step")
    families = read_counts(folder / "families_by_checkpoint.csv")
    first = {f: s for f, s in compare.first_above_chance(families).items() if s is not None}
    unigram = families[families["family"] == "unigram"]
    text += ("; unigram neurons among the universal ones: " + ", ".join(str(n) for n in unigram["n_universal"])
             + (f"; families first held by universal neurons more often than the rest: "
                + ", ".join(f"{f} at step {s}" for f, s in first.items()) if first else
                "; at no step do universal neurons hold a family more often than the rest (Fisher, Holm)"))
    return text + (f" ([`make compare`](docs/paper-runs.md#across-training-make-compare) "
                   f"`CHECKPOINTS=\"{' '.join(map(str, STEPS))}\"`, {seconds / 60:.1f} minutes here).")


def section(store: Path, seconds: float, compare_seconds: float) -> str:
    """The README's section, from the default run's files in `store`."""
    results = store / "results" / "toy-zoo"
    record = json.loads((results / f"checkpoint-{STEP}" / "run.json").read_text())
    excess = pd.read_csv(results / f"checkpoint-{STEP}" / "excess_correlation_scores.csv")
    contrasts = pd.read_csv(results / f"checkpoint-{STEP}" / "universal_vs_rest.csv")
    summary = pd.read_csv(results / f"checkpoint-{STEP}" / "ablation_summary.csv")
    layer_control = pd.read_csv(results / f"checkpoint-{STEP}" / "ablation_ablation_control-layer" /
                                "ablation_summary.csv")
    layers = [f"{int(layer['n_universal'])} in layer {layer['layer']} ({layer['fraction']:.1%})"
              for layer in record["layers"] if str(layer["layer"]) != "all"]
    top = excess.sort_values("excess_correlation", ascending=False).iloc[0]
    split = record["split_halves"]
    cut = split.get("cut_documents", 0)
    halves = (f"whole documents ({split['half_documents'][0]} and {split['half_documents'][1]} of the "
              f"{split['documents']}{f', {cut} cut in pieces for being longer than a quarter of the tokens' if cut else ''})"
              if "documents" in split else split["rule"])
    width = 2 * 1.96 * excess["excess_se"].median()
    n_live = record["n_neurons"] - (record["n_dead"] or 0)
    when = time.strftime("%Y-%m-%d")
    text = (
        f"Measured on {machine()} ({when}, `make readme-figures`; the cold `make analyze CHECKPOINT={STEP}` took "
        f"{seconds / 60:.1f} minutes with the zoo's training; another machine's figures differ in their last "
        f"digits): the five toy-zoo seeds at step {STEP}, "
        f"{record['n_tokens'] // 1000}k held-out tokens from {record['n_documents']} documents (in seeded random "
        f"order, the {record['positions']['dropped_excluded']} document-separator positions among them excluded), "
        f"threshold {record['threshold']:g}: {record['n_universal']} of {record['n_neurons']} neurons universal "
        f"({record['n_universal'] / record['n_neurons']:.1%}): {', '.join(layers)}; excess correlation median "
        f"{excess['excess_correlation'].median():.3f}, max {top.excess_correlation:.3f} (mean correlation "
        f"{top.mean_corr:.2f} against a rotated baseline of {top.mean_baseline:.2f} for the top neuron, layer "
        f"{int(top.layer)} neuron {int(top.neuron)}). The two halves of the tokens, {halves}, select "
        f"{record['n_universal_half_a']} and {record['n_universal_half_b']} neurons, split-half Jaccard "
        f"{record['split_half_jaccard']:.2f}; the median split-half standard error of an excess correlation is "
        f"{excess['excess_se'].median():.3f} (95 % intervals {width:.2f} wide). "
        + contrasts_text(contrasts, n_live - record["n_universal"]) + " "
        + families_text(read_counts(results / f"checkpoint-{STEP}" / "family_counts.csv"), record) + " "
        + ablation_text(summary, layer_control, record) + " "
        + compare_text(results / f"compare-{'-'.join(map(str, STEPS))}", compare_seconds))
    return wrap(text)


def wrap(text: str, width: int = 95) -> str:
    """The paragraph in lines of at most `width` characters, as the README's are."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(lines + [line])


def main() -> None:
    parser = argparse.ArgumentParser(prog="make readme-figures", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the section instead of writing README.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="readme-figures-") as fresh:
        store = Path(fresh)
        seconds = run(store, "analyze", "--checkpoint", str(STEP))
        run(store, "analyze", "--checkpoint", str(STEP), "--ablation-control", "layer")
        compare_seconds = run(store, "compare", "--checkpoints", " ".join(map(str, STEPS)))
        text = section(store, seconds, compare_seconds)
    if args.check:
        print(text)
        return
    readme = (REPO / "README.md").read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        sys.exit(f"README.md has no section between {BEGIN} and {END}")
    (REPO / "README.md").write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", readme))
    print(f"README.md: 'What the default analysis finds' rewritten from this machine's run ({machine()})")


if __name__ == "__main__":
    main()
