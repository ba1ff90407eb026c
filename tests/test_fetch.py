"""The data step: the download path, exercised offline through a file:// address standing in for the BEIR server,
and --force, which replaces the data set but never what was written beside it."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from retrieval_lab.data import fetch as fetch_module
from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.errors import DataError


def test_download_unzips_validates_and_places_the_data_set(beir_folder, tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    with zipfile.ZipFile(server / "toy.zip", "w") as zf:  # BEIR zips hold one folder named after the data set
        for path in beir_folder.rglob("*"):
            if path.is_file():
                zf.write(path, f"toy/{path.relative_to(beir_folder)}")
    monkeypatch.setattr(fetch_module, "BEIR_URL", server.as_uri() + "/{name}.zip")
    target = fetch_module.fetch("toy", tmp_path / "data")
    assert target == tmp_path / "data" / "toy"
    assert len(BeirDataset(target).corpus) == 60 and not list((tmp_path / "data").glob(".toy.*"))


def test_unreachable_address_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module, "BEIR_URL", (tmp_path / "nowhere").as_uri() + "/{name}.zip")
    with pytest.raises(DataError, match="could not download .* pass --source"):
        fetch_module.fetch("toy", tmp_path / "data")
    assert not (tmp_path / "data" / "toy").exists()


def _fetched_with_negatives(beir_folder, tmp_path):
    """A fetched copy whose corpus differs from the source's, with mined and teacher-scored negatives beside it."""
    target = fetch_module.fetch("toy", tmp_path / "data", source=beir_folder)
    (target / "corpus.jsonl").write_text((beir_folder / "corpus.jsonl").read_text().splitlines()[0] + "\n")
    (target / "negatives").mkdir()
    written = {"bm25-train.jsonl": '{"qid": "q1", "neg": ["d2"]}\n', "ce-train.jsonl": '{"qid": "q1", "s": [0.5]}\n'}
    for file, text in written.items():
        (target / "negatives" / file).write_text(text)
    return target, written


def test_force_replaces_the_data_set_and_keeps_negatives(beir_folder, tmp_path):
    target, written = _fetched_with_negatives(beir_folder, tmp_path)
    assert fetch_module.fetch("toy", tmp_path / "data", source=beir_folder, force=True) == target
    assert (target / "corpus.jsonl").read_bytes() == (beir_folder / "corpus.jsonl").read_bytes()
    assert {p.name: p.read_text() for p in (target / "negatives").iterdir()} == written
    assert not list((tmp_path / "data").glob(".toy.*"))


def test_fetching_over_a_different_copy_is_refused_and_changes_nothing(beir_folder, tmp_path, capsys):
    target, _ = _fetched_with_negatives(beir_folder, tmp_path)  # its corpus differs from the source's
    corpus = (target / "corpus.jsonl").read_bytes()
    with pytest.raises(DataError, match=r"already holds a copy of toy whose corpus.jsonl differs from .*--force"):
        fetch_module.fetch("toy", tmp_path / "data", source=beir_folder)
    assert (target / "corpus.jsonl").read_bytes() == corpus
    (target / "corpus.jsonl").write_bytes((beir_folder / "corpus.jsonl").read_bytes())  # now the same data set
    capsys.readouterr()
    assert fetch_module.fetch("toy", tmp_path / "data", source=beir_folder) == target
    assert f"already present, the same as {beir_folder}" in capsys.readouterr().out
    (target / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n")  # a split the source lacks
    with pytest.raises(DataError, match="whose qrels/dev.tsv differs"):
        fetch_module.fetch("toy", tmp_path / "data", source=beir_folder)


@pytest.mark.parametrize("failing", ["copy", "swap"])
def test_force_that_fails_midway_loses_nothing(beir_folder, tmp_path, monkeypatch, failing):
    target, written = _fetched_with_negatives(beir_folder, tmp_path)
    corpus_before = (target / "corpus.jsonl").read_text()
    if failing == "copy":  # the disk fills while the negatives are copied into the new folder
        copytree = fetch_module.shutil.copytree

        def flaky_copytree(src, dst, *args, **kwargs):
            if Path(src).name == "negatives":
                raise OSError(28, "No space left on device")
            return copytree(src, dst, *args, **kwargs)

        monkeypatch.setattr(fetch_module.shutil, "copytree", flaky_copytree)
    else:  # the new folder cannot be moved into place
        rename = Path.rename

        def flaky_rename(self, to):
            if self.name == "staged":
                raise OSError(13, "Permission denied")
            return rename(self, to)

        monkeypatch.setattr(Path, "rename", flaky_rename)
    with pytest.raises(OSError):
        fetch_module.fetch("toy", tmp_path / "data", source=beir_folder, force=True)
    assert (target / "corpus.jsonl").read_text() == corpus_before
    assert {p.name: p.read_text() for p in (target / "negatives").iterdir()} == written
    assert not list((tmp_path / "data").glob(".toy.*"))
