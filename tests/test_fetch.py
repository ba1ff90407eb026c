"""The data step: the download path, exercised offline through a file:// address standing in for the BEIR server
(with the md5 table patched to hold the toy zip's checksum), a .zip or folder given as --source, the refusals of
bad input (each one sentence, nothing written), and --force, which replaces the data set but never what was
written beside it."""
from __future__ import annotations

import errno
import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from retrieval_lab.data import fetch as fetch_module
from retrieval_lab.data.__main__ import main
from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.errors import DataError

WRONG_MD5 = "0" * 32


def make_zip(beir_folder: Path, path: Path, extra: dict[str, str] | None = None) -> str:
    """Zip the toy data set as BEIR does (one folder named after the data set), plus ``extra`` members; the md5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for file in beir_folder.rglob("*"):
            if file.is_file():
                zf.write(file, f"toy/{file.relative_to(beir_folder)}")
        for member, text in (extra or {}).items():
            zf.writestr(member, text)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server(beir_folder, tmp_path, monkeypatch):
    """A file:// BEIR server holding toy.zip, whose md5 is the published one; yields the zip's path."""
    md5 = make_zip(beir_folder, tmp_path / "server" / "toy.zip")
    monkeypatch.setattr(fetch_module, "BEIR_URL", (tmp_path / "server").as_uri() + "/{name}.zip")
    monkeypatch.setitem(fetch_module.BEIR_MD5, "toy", md5)
    return tmp_path / "server" / "toy.zip"


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` (hidden ones too), relative to it; [] when it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_download_unzips_validates_and_places_the_data_set(server, tmp_path):
    target = fetch_module.fetch("toy", tmp_path / "data")
    assert target == tmp_path / "data" / "toy"
    assert len(BeirDataset(target).corpus) == 60 and not list((tmp_path / "data").glob(".toy.*"))
    assert not list(target.rglob("*.zip"))


def test_published_table_holds_the_beir_md5s():
    assert fetch_module.BEIR_MD5["scifact"] == "5f7d1de60b170fc8027bb7898e2efca1"
    assert fetch_module.BEIR_MD5["nfcorpus"] == "a89dba18a62ef92f7d323ec890a0d38d"
    assert len(fetch_module.BEIR_MD5) == 15


def test_download_with_the_wrong_md5_is_refused_and_leaves_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setitem(fetch_module.BEIR_MD5, "toy", WRONG_MD5)
    url = fetch_module.BEIR_URL.format(name="toy")
    actual = hashlib.md5(server.read_bytes()).hexdigest()
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("toy", tmp_path / "data" / "sets")
    assert str(refused.value) == (f"{url} has md5 {actual}, not the expected {WRONG_MD5}; it was not unpacked and "
                                  f"nothing was changed.")
    assert not (tmp_path / "data").exists()  # not even the folders fetch would have made


def test_download_with_the_wrong_md5_leaves_an_existing_copy_as_it_was(server, beir_folder, tmp_path, monkeypatch):
    target = fetch_module.fetch("toy", tmp_path / "data", source=beir_folder)
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    monkeypatch.setitem(fetch_module.BEIR_MD5, "toy", WRONG_MD5)
    with pytest.raises(DataError, match=f"not the expected {WRONG_MD5}"):
        fetch_module.fetch("toy", tmp_path / "data", force=True)
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["toy"]


def test_a_name_without_a_published_md5_needs_md5(server, tmp_path, monkeypatch):
    md5 = fetch_module.BEIR_MD5["toy"]
    monkeypatch.delitem(fetch_module.BEIR_MD5, "toy")
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("toy", tmp_path / "data")
    assert str(refused.value).startswith("there is no published md5 for 'toy' (known: arguana, climate-fever, ")
    assert str(refused.value).endswith("); pass --md5 HEX to download it anyway, or --source with a local BEIR "
                                       "folder or .zip.")
    assert not (tmp_path / "data").exists()
    with pytest.raises(DataError, match=f"not the expected {WRONG_MD5}"):
        fetch_module.fetch("toy", tmp_path / "data", md5=WRONG_MD5)
    assert fetch_module.fetch("toy", tmp_path / "data", md5=md5.upper()).is_dir()


@pytest.mark.parametrize("md5, message", [
    ("abc", "--md5 abc is not an md5 checksum (32 hexadecimal digits)."),
    ("1" * 32, f"--md5 {'1' * 32} differs from the published md5 of scifact, 5f7d1de60b170fc8027bb7898e2efca1."),
])
def test_a_bad_md5_argument_is_one_sentence(md5, message, tmp_path):
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("scifact", tmp_path / "data", md5=md5)
    assert str(refused.value) == message and not (tmp_path / "data").exists()


def test_unreachable_address_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module, "BEIR_URL", (tmp_path / "nowhere").as_uri() + "/{name}.zip")
    monkeypatch.setitem(fetch_module.BEIR_MD5, "toy", WRONG_MD5)
    with pytest.raises(DataError, match="could not download .* pass --source"):
        fetch_module.fetch("toy", tmp_path / "data")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("member", ["../evil", "toy/../../evil", "/tmp/evil", "toy\\..\\..\\evil"])
def test_a_zip_member_outside_the_folder_is_refused(member, server, beir_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(fetch_module.BEIR_MD5, "toy", make_zip(beir_folder, server, {member: "boo"}))
    url = fetch_module.BEIR_URL.format(name="toy")
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("toy", tmp_path / "data")
    assert str(refused.value) == f"{url} holds a member with an unsafe path ({member!r}); nothing was extracted."
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("evil"))


def test_a_zip_bomb_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module, "MAX_UNZIPPED_BYTES", 1000)
    url = fetch_module.BEIR_URL.format(name="toy")
    message = rf"^{re.escape(url)} would unpack to [\d,]+ bytes, more than the 1,000 allowed; nothing was extracted\.$"
    with pytest.raises(DataError, match=message):
        fetch_module.fetch("toy", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_a_download_larger_than_the_limit_is_stopped(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module, "MAX_DOWNLOAD_BYTES", 100)
    url = fetch_module.BEIR_URL.format(name="toy")
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("toy", tmp_path / "data")
    assert str(refused.value) == f"{url} sends more than 100 bytes; the download was stopped and nothing was changed."
    assert not (tmp_path / "data").exists()


def test_source_zip_is_checked_and_unpacked_like_a_download(server, tmp_path, monkeypatch):
    local = tmp_path / "toy.zip"
    server.rename(local)  # downloaded by hand: the server is not asked
    target = fetch_module.fetch("toy", tmp_path / "data", source=local)
    assert len(BeirDataset(target).corpus) == 60
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["toy"] and local.is_file()
    monkeypatch.setitem(fetch_module.BEIR_MD5, "toy", WRONG_MD5)
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("toy", tmp_path / "other", source=local)
    assert str(refused.value) == (f"{local} has md5 {hashlib.md5(local.read_bytes()).hexdigest()}, not the expected "
                                  f"{WRONG_MD5}; it was not unpacked and nothing was changed.")
    assert not (tmp_path / "other").exists()


def test_source_zip_of_an_unpublished_name_is_unpacked(beir_folder, tmp_path):
    local = tmp_path / "mine.ZIP"
    make_zip(beir_folder, local)
    assert len(BeirDataset(fetch_module.fetch("mine", tmp_path / "data", source=local)).corpus) == 60


def test_source_zip_that_is_not_a_zip_is_one_sentence(tmp_path):
    local = tmp_path / "mine.zip"
    local.write_text("not a zip")
    with pytest.raises(DataError, match=rf"^{re.escape(str(local))} is not a readable zip archive \(.*\)\.$"):
        fetch_module.fetch("mine", tmp_path / "data", source=local)
    assert not (tmp_path / "data").exists()


def test_source_naming_a_plain_file_is_one_sentence(tmp_path):
    plain = tmp_path / "corpus.jsonl"
    plain.write_text("{}\n")
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("mine", tmp_path / "data", source=plain)
    assert str(refused.value) == f"--source {plain} is a file, not a BEIR folder or a .zip archive of one."
    assert not (tmp_path / "data").exists()


def test_md5_beside_a_source_folder_is_one_sentence(beir_folder, tmp_path):
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("mine", tmp_path / "data", source=beir_folder, md5=WRONG_MD5)
    assert str(refused.value) == f"--md5 checks a .zip archive, and --source {beir_folder} is a folder."
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name", ["..", "../toy", "a/b", "a\\b", ".toy", "to..y", "", "a b", "/abs"])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(name, beir_folder, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(DataError) as refused:
        fetch_module.fetch(name, work / "data", source=beir_folder)
    assert str(refused.value) == (f"data set name {name!r} is not a plain name (letters, digits, '.', '_' and '-', "
                                  f"starting with a letter or digit, no '..'), and it becomes a folder under --dest.")
    assert listing(tmp_path) == []


def test_dest_naming_a_file_is_one_sentence(beir_folder, tmp_path):
    dest = tmp_path / "data"
    dest.write_text("notes")
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("toy", dest, source=beir_folder)
    assert str(refused.value) == f"--dest {dest} is a file, not a folder."
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("toy", dest / "sets", source=beir_folder)
    assert str(refused.value) == f"--dest {dest / 'sets'} lies under {dest}, which is a file, not a folder."
    assert dest.read_text() == "notes" and listing(tmp_path) == ["data"]


def test_dest_name_that_is_a_file_is_one_sentence(beir_folder, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy").write_text("notes")
    for force in (False, True):
        with pytest.raises(DataError) as refused:
            fetch_module.fetch("toy", tmp_path / "data", source=beir_folder, force=force)
        assert str(refused.value) == (f"{tmp_path / 'data' / 'toy'} exists and is a file, not a BEIR folder; move "
                                      f"it aside or choose another --dest.")
    assert (tmp_path / "data" / "toy").read_text() == "notes" and listing(tmp_path) == ["data", "data/toy"]


@pytest.mark.parametrize("failing", ["copy", "temporary folder"])
def test_an_unwritable_destination_is_one_sentence_and_leaves_nothing(failing, beir_folder, tmp_path, monkeypatch):
    if failing == "copy":  # the disk fills while the data set is copied into the temporary folder
        def full(src, dst, *args, **kwargs):
            Path(dst).mkdir()
            (Path(dst) / "corpus.jsonl").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(fetch_module.shutil, "copytree", full)
        reason = "No space left on device"
    else:  # the destination folder may not be written
        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(fetch_module.tempfile, "TemporaryDirectory", denied)
        reason = "Permission denied"
    dest = tmp_path / "data" / "sets"
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("toy", dest, source=beir_folder)
    assert str(refused.value) == f"could not write {dest / 'toy'} ({reason}); nothing was changed."
    assert not (tmp_path / "data").exists()


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


def test_force_with_a_download_keeps_negatives(server, beir_folder, tmp_path):
    target, written = _fetched_with_negatives(beir_folder, tmp_path)
    assert fetch_module.fetch("toy", tmp_path / "data", force=True) == target
    assert (target / "corpus.jsonl").read_bytes() == (beir_folder / "corpus.jsonl").read_bytes()
    assert {p.name: p.read_text() for p in (target / "negatives").iterdir()} == written
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["toy"]


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
        reason = "No space left on device"
    else:  # the new folder cannot be moved into place
        rename = Path.rename

        def flaky_rename(self, to):
            if self.name == "staged":
                raise OSError(13, "Permission denied")
            return rename(self, to)

        monkeypatch.setattr(Path, "rename", flaky_rename)
        reason = "Permission denied"
    with pytest.raises(DataError) as refused:
        fetch_module.fetch("toy", tmp_path / "data", source=beir_folder, force=True)
    assert str(refused.value) == f"could not write {target} ({reason}); nothing was changed."
    assert (target / "corpus.jsonl").read_text() == corpus_before
    assert {p.name: p.read_text() for p in (target / "negatives").iterdir()} == written
    assert not list((tmp_path / "data").glob(".toy.*"))


def test_the_cli_prints_one_error_line(tmp_path, capsys):
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    with pytest.raises(SystemExit) as exited:
        main(["fetch", "toy", "--source", str(plain), "--dest", str(tmp_path / "data")])
    assert exited.value.code == 2
    refusal = f"--source {plain} is a file, not a BEIR folder or a .zip archive of one."
    assert capsys.readouterr().err == f"error: {refusal}\n"
    with pytest.raises(SystemExit):
        main(["fetch", "../x", "--dest", str(tmp_path / "data")])
    assert capsys.readouterr().err.startswith("error: data set name '../x' is not a plain name")
    assert not (tmp_path / "data").exists()
