"""The data step's download path, exercised offline through a file:// address standing in for the BEIR server."""
from __future__ import annotations

import zipfile

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
