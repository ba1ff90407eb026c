"""Collect a sweep into one table: `python -m retrieval_lab.report <multirun dir> [--baseline "loss=infonce"]`.

Every run directory under the folder that holds a ``metrics.json`` is one run; runs whose Hydra overrides differ
only in ``seed`` form one configuration. For each configuration and metric the table gives mean ± standard
deviation over seeds, and a paired test over queries (per-query scores averaged over seeds; ranx's paired
t-test, or with --test fisher a paired randomisation test, scipy's, which is exact for up to 13 queries and seeded
otherwise) against the baseline configuration marks significant differences. The p-values of one metric's
comparisons with the baseline are adjusted by Holm's step-down method (``--correction holm``, the default; ``none``
keeps them as they are). A job folder without a metrics.json (a failed or unfinished run) and two runs of one
configuration with the same seed are named in a warning.
Writes ``report.md``, ``report.csv``, one bar plot per metric and the validation curves (PNG) into ``--out``
(default ``<folder>/report``).
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from retrieval_lab.errors import DataError, exit_on_user_error, warn
from retrieval_lab.files import atomic_write, atomic_write_text
from retrieval_lab.retrieval.runfile import read_json, read_trec_run

IGNORED = ("seed", "hydra.")
TESTS = {"student": "paired t-test", "fisher": "Fisher randomisation test"}
CORRECTIONS = {"holm": "Holm-adjusted over the configurations compared with the baseline on each metric",
               "none": "no correction for multiple comparisons"}


@dataclass
class Config:
    label: dict[str, str]
    runs: list[Path] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    means: dict[str, list[float]] = field(default_factory=dict)      # metric -> one value per run
    scored: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # metric -> qid -> one value per run file

    @property
    def per_query(self) -> dict[str, dict[str, float]]:
        """metric -> qid -> mean over the runs whose run file scored that query."""
        return {m: {q: statistics.fmean(v) for q, v in by_q.items()} for m, by_q in self.scored.items()}

    @property
    def name(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.label.items()) or "(defaults)"


def find_runs(folder: Path) -> list[tuple[Path, dict[str, str], dict]]:
    found = []
    def natural(path: Path):  # job folders 0, 1, ..., 10 in numeric order
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.relative_to(folder).parts]

    def skipped(run: Path) -> bool:  # a report's folder, and a restarted run's earlier outputs, are no runs
        parts = run.relative_to(folder).parts
        return "report" in parts or any(re.fullmatch(r"previous(-\d+)?", part) for part in parts)

    for job in sorted((f.parent.parent for f in folder.rglob(".hydra/overrides.yaml")), key=natural):
        if not skipped(job) and not (job / "metrics.json").is_file():
            warn(f"{job} has no metrics.json (a failed or unfinished run): left out of the report.")
    for metrics_file in sorted(folder.rglob("metrics.json"), key=natural):
        run = metrics_file.parent
        if skipped(run):
            continue
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        choices = dict(o.lstrip("+~").split("=", 1) for o in overrides or [] if "=" in o)
        found.append((run, choices, read_json(metrics_file)))
    if not found:
        raise DataError(f"no run under {folder} has a metrics.json (is it a multirun folder of finished runs?).")
    return found


def run_scores(run: Path, metrics: dict, stage: str) -> tuple[dict[str, float], Path | None]:
    """The run's mean metrics of ``stage`` (training) or of an evaluation, and its TREC run file."""
    if stage in metrics:
        return metrics[stage], run / stage / "run.trec"
    if "metrics" in metrics:
        return metrics["metrics"], run / "run.trec"
    raise DataError(f"{run / 'metrics.json'} has no '{stage}' metrics (set --stage to one it has).")


def judged_qrels(run: Path, cache: dict):
    """The qrels the run was scored on, from its saved config (data.path and the evaluated split)."""
    from retrieval_lab.data.beir import BeirDataset

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")  # as saved: interpolations resolve on access
    split = OmegaConf.select(cfg, "eval.split") or OmegaConf.select(cfg, "split")
    path = Path(OmegaConf.select(cfg, "data.path"))
    hydra_file = run / ".hydra" / "hydra.yaml"
    if not path.is_absolute() and hydra_file.is_file():  # relative to where the run was started
        cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd")
        path = Path(cwd) / path if cwd else path
    key = (str(path), split)
    if key not in cache:
        cache[key] = BeirDataset(path).qrels(split)
    return cache[key]


def collect(folder: Path, metrics: list[str], stage: str) -> list[Config]:
    from retrieval_lab.retrieval.metrics import per_query

    found = find_runs(folder)
    varying = sorted({k for _, c, _ in found for k in c
                      if not k.startswith(IGNORED) and len({x.get(k) for _, x, _ in found}) > 1})
    configs: dict[tuple, Config] = {}
    qrels_cache: dict = {}
    for run, choices, saved in found:
        label = {k: choices.get(k, "-") for k in varying}
        config = configs.setdefault(tuple(label.items()), Config(label))
        scores, run_file = run_scores(run, saved, stage)
        config.runs.append(run)
        config.seeds.append(choices.get("seed", "-"))
        for m in metrics:
            if m not in scores:
                raise DataError(f"{run / 'metrics.json'} has no {m} (metrics there: {', '.join(scores)}).")
            config.means.setdefault(m, []).append(float(scores[m]))
        if run_file is not None and run_file.is_file() and (run / ".hydra" / "config.yaml").is_file():
            queries = per_query(judged_qrels(run, qrels_cache), read_trec_run(run_file), metrics)
            for m, by_q in queries.items():  # a run without a run file adds nothing here
                for q, v in by_q.items():
                    config.scored.setdefault(m, {}).setdefault(q, []).append(v)
    for config in configs.values():
        repeated = sorted({s for s in config.seeds if config.seeds.count(s) > 1})
        if repeated:
            warn(f"{config.name}: {len(config.runs)} runs with seed {', '.join(repeated)} counted as separate runs "
                 f"({', '.join(str(r) for r in config.runs)}).")
    return list(configs.values())


def significance(baseline: Config, other: Config, metric: str, test: str, max_p: float) -> tuple[float, float] | None:
    """p-value of the paired test over the queries both configurations were scored on, and the mean difference
    (other - baseline) on those queries, which gives the direction; None: not testable."""
    import numpy as np
    from ranx.statistical_tests import paired_student_t_test
    from scipy.stats import permutation_test

    a, b = baseline.per_query.get(metric), other.per_query.get(metric)
    if not a or not b or other is baseline:
        return None
    qids = sorted(a.keys() & b.keys())
    if not qids:
        return None
    if len(qids) < len(a.keys() | b.keys()):
        warn(f"{other.name} and the baseline were scored on different queries: {metric} is tested on the "
             f"{len(qids)} they share.")
    x, y = np.array([a[q] for q in qids]), np.array([b[q] for q in qids])
    difference = float(np.mean(y - x))
    if len(qids) < 2 or np.allclose(x, y):
        return 1.0, difference
    if test == "student":
        p, _ = paired_student_t_test(x, y, max_p)
    else:  # ranx's randomisation test draws in numba threads that its seed does not reach: not reproducible
        p = permutation_test((x, y), lambda u, v: np.mean(u - v), permutation_type="samples", n_resamples=9999,
                             random_state=42, vectorized=False).pvalue
    return float(p), difference


def holm(p_values: list[float]) -> list[float]:
    """Holm (1979), "A Simple Sequentially Rejective Multiple Test Procedure": with the m p-values sorted,
    p_(1) <= ... <= p_(m), the k-th becomes max_{j <= k} min(1, (m - j + 1) p_(j)). Rejecting where the adjusted
    value is <= alpha keeps the chance of any false rejection among the m at most alpha."""
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(sorted(range(len(p_values)), key=p_values.__getitem__)):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def pick_baseline(configs: list[Config], spec: str | None) -> Config:
    if not spec:
        return configs[0]
    wanted = dict(part.split("=", 1) for part in spec.replace(",", " ").split())
    matches = [c for c in configs if all(c.label.get(k) == v for k, v in wanted.items())]
    if len(matches) != 1:
        names = "; ".join(c.name for c in configs)
        raise DataError(f"--baseline '{spec}' matches {len(matches)} configurations, not one (there are: {names}).")
    return matches[0]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def tables(configs: list[Config], baseline: Config, metrics: list[str], test: str, max_p: float,
           correction: str = "holm") -> tuple[str, str]:
    keys = list(baseline.label)
    tested = {(id(c), m): significance(baseline, c, m, test, max_p) for m in metrics for c in configs}
    adjusted = {}
    for m in metrics:  # one family per metric: its comparisons with the baseline
        family = [id(c) for c in configs if tested[id(c), m]]
        raw = [tested[c, m][0] for c in family]
        adjusted.update(zip(((c, m) for c in family), holm(raw) if correction == "holm" else raw))
    md = io.StringIO()
    md.write("| " + " | ".join([*keys, "runs", *metrics]) + " |\n|" + " --- |" * (len(keys) + 1 + len(metrics)) + "\n")
    rows = []
    for c in configs:
        cells, row = [], {**c.label, "runs": len(c.runs), "baseline": c is baseline}
        for m in metrics:
            mean, std = mean_std(c.means[m])
            result = tested[id(c), m]  # (p, difference) or None
            p, p_adjusted = (result[0], adjusted[id(c), m]) if result else (None, None)
            mark = ""
            if result and p_adjusted <= max_p and result[1] != 0:
                mark = " ▲" if result[1] > 0 else " ▼"
            cells.append(f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "") + mark)
            row.update({f"{m}_mean": round(mean, 6), f"{m}_std": None if std is None else round(std, 6), f"{m}_p": p,
                        f"{m}_p_adjusted": p_adjusted})
        name_cells = [*c.label.values()] if c is not baseline else [f"**{v}**" for v in c.label.values()]
        md.write("| " + " | ".join([*name_cells, str(len(c.runs)), *cells]) + " |\n")
        rows.append(row)
    md.write(f"\nBold: the baseline. ▲/▼: significantly better/worse than the baseline ({TESTS[test]} over "
             f"queries on per-query scores averaged over seeds, p <= {max_p}, {CORRECTIONS[correction]}). "
             f"Mean ± sample standard deviation over runs (no ± for a single run).\n")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return md.getvalue(), out.getvalue()


def plots(configs: list[Config], metrics: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = [c.name for c in configs]
    for m in metrics:
        stats = [(mean, std or 0.0) for mean, std in (mean_std(c.means[m]) for c in configs)]
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(configs) + 2), 4))
        ax.bar(range(len(configs)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(configs)), names, rotation=30, ha="right", fontsize=7)
        low = max(0.0, min(s[0] - s[1] for s in stats) - 0.05)
        ax.set_ylim(low, None)
        ax.set_ylabel(m if low == 0 else f"{m} (axis from {low:.2f}, not 0)")
        fig.tight_layout()
        path = out / f"{m.replace('@', '_at_')}.png"
        atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format="png"))
        plt.close(fig)
        written.append(path)
    curves = {c.name: [validation_curve(r) for r in c.runs] for c in configs}
    if any(curve for runs in curves.values() for curve in runs):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (name, runs) in enumerate(curves.items()):
            for j, curve in enumerate(c for c in runs if c):
                ax.plot(*zip(*curve), color=f"C{i % 10}", alpha=0.8, label=name if j == 0 else None, marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("val/ndcg@10")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "validation_curves.png"
        atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def validation_curve(run: Path, key: str = "val/ndcg@10") -> list[tuple[int, float]]:
    log = run / "csv" / "metrics.csv"
    if not log.is_file():
        return []
    with open(log, newline="") as handle:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(handle) if row.get(key)]


def report(folder: Path, metrics: list[str], stage: str = "after", baseline: str | None = None,
           test: str = "student", max_p: float = 0.05, out: Path | None = None, correction: str = "holm") -> Path:
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder (give the multirun directory of a sweep).")
    configs = collect(folder, metrics, stage)
    base = pick_baseline(configs, baseline)
    md, table_csv = tables(configs, base, metrics, test, max_p, correction)
    out = out or folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = plots(configs, metrics, out)
    atomic_write_text(out / "report.md", f"# {folder}\n\n{md}\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images))
    atomic_write_text(out / "report.csv", table_csv)
    print(md)
    print(f"report.md, report.csv and {len(images)} plots in {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a multirun folder (or any folder of finished runs)")
    parser.add_argument("--metrics", nargs="+", default=["ndcg@10", "recall@100", "mrr@10"])
    parser.add_argument("--stage", default="after", help="which metrics of a training run: after or before")
    parser.add_argument("--baseline", help='the baseline row, e.g. "loss=infonce negatives=inbatch" (default: first)')
    parser.add_argument("--test", choices=["student", "fisher"], default="student")
    parser.add_argument("--max-p", type=float, default=0.05)
    parser.add_argument("--correction", choices=list(CORRECTIONS), default="holm",
                        help="multiple comparisons: Holm's step-down adjustment per metric (default), or none")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        report(args.folder, args.metrics, args.stage, args.baseline, args.test, args.max_p, args.out, args.correction)


if __name__ == "__main__":
    main()
