"""The sweep report on a synthetic multirun folder: table values against hand computation (mean, sample std,
scipy's paired t-test on per-query nDCG@10 computed from the ranks, the randomisation test by enumeration), the
baseline choice, the direction marks, plots, warnings and errors."""
from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import yaml
from scipy.stats import ttest_rel

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.errors import DataError
from retrieval_lab.report import report

# rank of each test query's one relevant document, per configuration and seed
RANKS = {
    "infonce": {1: lambda i: 1 + i % 3, 2: lambda i: 1 + (i + 1) % 3},
    "samtone": {1: lambda i: 1, 2: lambda i: 1 + (i == 0)},
    "margin": {1: lambda i: 1 + i % 3, 2: lambda i: 1 + (i + 1) % 3},   # the same rankings as infonce
}


def ndcg(rank):  # one relevant document (gain 1) at ``rank``
    return 1 / math.log2(rank + 1) if rank <= 10 else 0.0


@pytest.fixture
def sweep(beir_folder, tmp_path):
    qrels = BeirDataset(beir_folder).qrels("test")
    qids = sorted(qrels)
    per_query = {}
    for num, (loss, seed) in enumerate((l, s) for l in RANKS for s in (1, 2)):
        run = tmp_path / "sweep" / str(num)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss={loss}", f"seed={seed}", "batch_size=8"]))
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(beir_folder)},
                                                                    "eval": {"split": "test"}}))
        lines, scores = [], []
        for i, q in enumerate(qids):
            relevant, rank = next(iter(qrels[q])), RANKS[loss][seed](i)
            others = [f"d{k}" for k in range(60) if f"d{k}" != relevant][:9]
            ranking = others[:rank - 1] + [relevant] + others[rank - 1:]
            lines += [f"{q} Q0 {d} {r} {10 - r} t" for r, d in enumerate(ranking, 1)]
            scores.append(ndcg(rank))
        per_query[(loss, seed)] = scores
        (run / "after").mkdir()
        (run / "after" / "run.trec").write_text("\n".join(lines) + "\n")
        mean = statistics.fmean(scores)
        (run / "metrics.json").write_text(json.dumps({"after": {"ndcg@10": mean, "recall@100": 1.0}}))
        (run / "csv").mkdir()
        (run / "csv" / "metrics.csv").write_text("epoch,step,val/ndcg@10\n0,10,0.5\n1,20,0.6\n")
    return tmp_path / "sweep", per_query


def test_report_table_matches_hand_computation(sweep):
    """(A run restarted afresh keeps its earlier outputs in previous/: no run of its own.)"""
    folder, per_query = sweep
    (folder / "0" / "previous").mkdir()
    (folder / "0" / "previous" / "metrics.json").write_text(json.dumps({"after": {"ndcg@10": 0.0, "recall@100": 0.0}}))
    out = report(folder, ["ndcg@10", "recall@100"], baseline="loss=infonce")
    rows = {r["loss"]: r for r in csv.DictReader(open(out / "report.csv"))}
    assert set(rows) == {"infonce", "samtone", "margin"} and rows["infonce"]["runs"] == "2"
    for loss in RANKS:
        seeds = [statistics.fmean(per_query[(loss, s)]) for s in (1, 2)]
        assert float(rows[loss]["ndcg@10_mean"]) == pytest.approx(statistics.fmean(seeds), abs=1e-6)
        assert float(rows[loss]["ndcg@10_std"]) == pytest.approx(statistics.stdev(seeds), abs=1e-6)
    averaged = {loss: [(a + b) / 2 for a, b in zip(per_query[(loss, 1)], per_query[(loss, 2)])] for loss in RANKS}
    expected_p = ttest_rel(averaged["infonce"], averaged["samtone"]).pvalue
    assert float(rows["samtone"]["ndcg@10_p"]) == pytest.approx(expected_p, rel=1e-6)
    assert float(rows["margin"]["ndcg@10_p"]) == 1.0 and rows["infonce"]["ndcg@10_p"] == ""
    # Holm over the two comparisons: the smaller p doubled, the larger (1.0) kept
    assert float(rows["samtone"]["ndcg@10_p_adjusted"]) == pytest.approx(2 * expected_p, rel=1e-6)
    assert float(rows["margin"]["ndcg@10_p_adjusted"]) == 1.0
    md = (out / "report.md").read_text()
    samtone_row = next(line for line in md.splitlines() if line.startswith("| samtone"))
    assert "▲" in samtone_row and 2 * expected_p < 0.05
    assert "▲" not in next(line for line in md.splitlines() if line.startswith("| margin"))
    assert (out / "ndcg_at_10.png").stat().st_size > 0 and (out / "validation_curves.png").is_file()


def test_report_refuses_what_it_cannot_read(sweep, tmp_path):
    folder, _ = sweep
    with pytest.raises(DataError, match="matches 0 configurations"):
        report(folder, ["ndcg@10"], baseline="loss=nothing")
    with pytest.raises(DataError, match="has no mrr@10"):
        report(folder, ["mrr@10"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has a metrics.json"):
        report(tmp_path / "empty", ["ndcg@10"])
    (folder / "0" / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match="0/metrics.json is not valid JSON"):
        report(folder, ["ndcg@10"])


def test_per_query_means_count_only_the_runs_with_a_run_file(sweep):
    """A run of a configuration without its run file adds nothing to the per-query means of the paired test: the
    first run of loss=infonce (seed 1) has none, so the configuration's per-query nDCG@10 is seed 2's alone."""
    from retrieval_lab.report import collect

    folder, per_query = sweep
    (folder / "0" / "after" / "run.trec").unlink()  # loss=infonce, seed=1
    infonce = next(c for c in collect(folder, ["ndcg@10"], "after") if c.label.get("loss") == "infonce")
    assert len(infonce.runs) == 2
    scores = infonce.per_query["ndcg@10"]
    assert [scores[q] for q in sorted(scores)] == pytest.approx(per_query[("infonce", 2)])


def config_with(name: str, means: list[float], per_query: dict[str, float]):
    """A configuration of ``len(means)`` runs, one of them with a run file scoring ``per_query``."""
    from retrieval_lab.report import Config

    config = Config({"loss": name}, runs=[f"{name}/{i}" for i in range(len(means))],
                    seeds=[str(i) for i in range(len(means))])
    config.means["ndcg@10"] = means
    config.scored["ndcg@10"] = {q: [v] for q, v in per_query.items()}
    return config


def test_the_mark_follows_the_tested_queries_and_one_run_has_no_deviation():
    """The baseline's mean (1.0 and 0.5 over two runs) lies above the other configuration's (0.6), but only its
    second run has a run file, and on those queries the other is better: ▲, as the test compared them. A
    configuration of one run shows no ± (a sample deviation of one value is undefined)."""
    from retrieval_lab.report import tables

    base = config_with("infonce", [1.0, 0.5], {f"q{i}": 0.5 + 0.01 * (i % 2) for i in range(10)})
    other = config_with("samtone", [0.6], {f"q{i}": 0.6 + 0.02 * (i % 3) for i in range(10)})
    md, table = tables([base, other], base, ["ndcg@10"], "student", 0.05)
    assert "| samtone | 1 | 0.6000 ▲ |" in md and "| **infonce** | 2 | 0.7500 ± 0.3536 |" in md
    rows = list(csv.DictReader(table.splitlines()))
    assert rows[1]["ndcg@10_std"] == ""
    assert float(rows[0]["ndcg@10_std"]) == pytest.approx(statistics.stdev([1, 0.5]), abs=1e-6)


def test_holm_adjusts_as_its_step_down_definition():
    """p = (0.01, 0.04, 0.03, 0.005), m = 4, sorted 0.005, 0.01, 0.03, 0.04: times 4, 3, 2, 1 gives 0.02, 0.03,
    0.06, 0.04, and each adjusted value is the running maximum: 0.02, 0.03, 0.06, 0.06."""
    from retrieval_lab.report import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.4, 0.9]) == pytest.approx([0.8, 0.9]) and holm([0.7, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == [] and holm([0.02]) == [0.02]


def test_two_differences_significant_alone_are_not_once_corrected():
    """Two configurations each differ from the baseline with a t-test p between 0.025 and 0.05: marked without a
    correction, not under Holm (the smaller p doubled is above 0.05, and the larger takes the running maximum)."""
    from retrieval_lab.report import tables

    x = [0.5, 0.6, 0.2, 0.9, 0.4, 0.3, 0.7, 0.1, 0.8, 0.5]
    ys = {"b": [0.49, 0.61, 0.23, 0.95, 0.4, 0.32, 0.74, 0.09, 0.81, 0.53],
          "c": [0.49, 0.63, 0.2, 0.94, 0.41, 0.35, 0.72, 0.09, 0.83, 0.5]}
    raw = {name: ttest_rel(x, y).pvalue for name, y in ys.items()}
    assert all(0.025 < p < 0.05 for p in raw.values())
    base = config_with("a", [0.5], {f"q{i}": v for i, v in enumerate(x)})
    others = [config_with(name, [0.5], {f"q{i}": v for i, v in enumerate(y)}) for name, y in ys.items()]
    plain, _ = tables([base, *others], base, ["ndcg@10"], "student", 0.05, "none")
    corrected, table = tables([base, *others], base, ["ndcg@10"], "student", 0.05)
    def marked(md):
        return [line.split(" |")[0] for line in md.splitlines() if line.startswith("| ") and "▲" in line]

    assert marked(plain) == ["| b", "| c"] and "no correction" in plain
    assert marked(corrected) == [] and "Holm-adjusted" in corrected
    rows = {r["loss"]: r for r in csv.DictReader(table.splitlines())}
    smaller, larger = sorted(raw.values())
    assert float(rows["b"]["ndcg@10_p_adjusted"]) == pytest.approx(2 * smaller, rel=1e-6)
    assert float(rows["c"]["ndcg@10_p_adjusted"]) == pytest.approx(max(2 * smaller, larger), rel=1e-6)


def test_the_randomisation_test_is_exact_on_few_queries_and_the_same_every_time():
    """10 queries: all 2^10 sign flips of the paired differences, enumerated by hand, give the two-sided p-value."""
    import itertools

    import numpy as np

    from retrieval_lab.report import significance

    x = [0.5, 0.6, 0.2, 0.9, 0.4, 0.3, 0.7, 0.1, 0.8, 0.5]
    y = [0.6, 0.7, 0.2, 0.95, 0.6, 0.3, 0.65, 0.3, 0.9, 0.55]
    base = config_with("a", [0.5], {f"q{i}": v for i, v in enumerate(x)})
    other = config_with("b", [0.6], {f"q{i}": v for i, v in enumerate(y)})
    d = np.array(y) - np.array(x)
    flips = [abs(np.mean(d * np.array(signs))) for signs in itertools.product([1, -1], repeat=10)]
    expected = np.mean([f >= abs(d.mean()) - 1e-12 for f in flips])
    p, difference = significance(base, other, "ndcg@10", "fisher", 0.05)
    assert p == pytest.approx(expected) and difference == pytest.approx(d.mean())
    assert significance(base, other, "ndcg@10", "fisher", 0.05)[0] == p


def test_queries_scored_by_one_side_only_are_left_out_of_the_test_and_named(capsys):
    from retrieval_lab.report import significance

    base = config_with("a", [0.5], {"q1": 0.5, "q2": 0.4, "q3": 0.3})
    other = config_with("b", [0.6], {"q1": 0.6, "q2": 0.6, "q4": 0.9})
    assert significance(base, other, "ndcg@10", "student", 0.05)[1] == pytest.approx(0.15)
    assert "were scored on different queries: ndcg@10 is tested on the 2 they share" in capsys.readouterr().err
    apart = config_with("c", [0.6], {"q7": 0.6, "q8": 0.6})
    assert significance(base, apart, "ndcg@10", "student", 0.05) is None  # nothing to pair: not tested


def test_failed_runs_and_repeated_seeds_are_named_and_a_relative_data_path_is_found(sweep, tmp_path, monkeypatch,
                                                                                     beir_folder, capsys):
    """A job folder without metrics.json is named; two runs of one configuration with one seed are named; a run
    whose data.path is relative to where it was started (.hydra/hydra.yaml's runtime.cwd) is scored from anywhere."""
    folder, _ = sweep
    (folder / "5" / "metrics.json").unlink()  # loss=margin, seed=2 failed
    overrides = folder / "1" / ".hydra" / "overrides.yaml"  # loss=infonce's second run: seed 1 again
    overrides.write_text(overrides.read_text().replace("seed=2", "seed=1"))
    for run in folder.iterdir():
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"path": beir_folder.name},
                                                                    "eval": {"split": "test"}}))
        runtime = {"hydra": {"runtime": {"cwd": str(beir_folder.parent)}}}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(runtime))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = report(folder, ["ndcg@10"], baseline="loss=infonce")
    err = capsys.readouterr().err
    assert f"warning: {folder / '5'} has no metrics.json (a failed or unfinished run): left out of the report." in err
    repeated = f"warning: loss=infonce: 2 runs with seed 1 counted as separate runs ({folder / '0'}, {folder / '1'})."
    assert repeated in err
    rows = {r["loss"]: r for r in csv.DictReader(open(out / "report.csv"))}
    assert rows["margin"]["runs"] == "1" and rows["samtone"]["ndcg@10_p"] != ""
