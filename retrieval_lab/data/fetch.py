"""Put a BEIR data set in place: download it from its public address (checking the published md5), unpack a zip
downloaded by hand, or copy a local folder when offline."""
from __future__ import annotations

import filecmp
import hashlib
import http.client
import re
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from retrieval_lab.data.beir import BeirDataset, available_splits
from retrieval_lab.errors import DataError

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
DATA_SET_FILES = ("corpus.jsonl", "queries.jsonl", "qrels")  # what fetch --force replaces in an existing folder

# The md5 of each public BEIR zip, copied from the "md5" column of the dataset table in the README of
# https://github.com/beir-cellar/beir (commit ef83d29307061c65d04b035b4f4e7c18bd8374af, October 2025).
BEIR_MD5 = {
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "quora": "18fb154900ba42a600f84b839c173167",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
}
# The largest BEIR zip (msmarco) is about 1 GB and unpacks to a few GB; these limits stop a hostile or broken
# server, or a zip bomb, long before a disk fills.
MAX_DOWNLOAD_BYTES = 8 << 30
MAX_UNZIPPED_BYTES = 32 << 30
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MD5 = re.compile(r"[0-9a-f]{32}")


def validate(folder: Path) -> str:
    """Read every file of a BEIR folder (raising DataError on the first fault); return a one-line summary."""
    data = BeirDataset(folder)
    splits = available_splits(folder)
    if not splits:
        raise DataError(f"{folder}/qrels holds no <split>.tsv file.")
    sizes = ", ".join(f"{s}: {len(data.qrels(s))} queries" for s in splits)
    return f"{folder}: {len(data.corpus)} documents, {len(data.queries)} queries ({sizes})"


def first_difference(folder: Path, source: Path) -> str | None:
    """The first data set file (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) in which two BEIR folders differ."""
    def files(root: Path) -> set[str]:
        names = {n for n in DATA_SET_FILES[:2] if (root / n).is_file()}
        return names | {f"qrels/{p.name}" for p in (root / "qrels").glob("*.tsv")}

    ours, theirs = files(folder), files(source)
    for name in sorted(ours | theirs):
        if name not in ours or name not in theirs or not filecmp.cmp(folder / name, source / name, shallow=False):
            return name
    return None


def expected_md5(name: str, md5: str | None) -> str | None:
    """The md5 an archive of ``name`` must have: ``md5`` if given (it must match the table for a known name),
    else the published one from BEIR_MD5, else None."""
    if md5 is None:
        return BEIR_MD5.get(name)
    if not MD5.fullmatch(md5.lower()):
        raise DataError(f"--md5 {md5} is not an md5 checksum (32 hexadecimal digits).")
    if name in BEIR_MD5 and md5.lower() != BEIR_MD5[name]:
        raise DataError(f"--md5 {md5} differs from the published md5 of {name}, {BEIR_MD5[name]}.")
    return md5.lower()


def _check_arguments(name: str, dest: Path, source: Path | None, md5: str | None) -> None:
    """Refuse, before anything is written, a name that is not a plain folder name, a --source that is neither a
    folder nor a .zip file, a --md5 beside a folder, and a --dest that is (or lies under) a file."""
    if not NAME.fullmatch(name) or ".." in name:
        raise DataError(f"data set name {name!r} is not a plain name (letters, digits, '.', '_' and '-', starting "
                        f"with a letter or digit, no '..'), and it becomes a folder under --dest.")
    if source is not None:
        if not source.exists():
            raise DataError(f"--source {source} not found.")
        if source.is_dir():
            if md5 is not None:
                raise DataError(f"--md5 checks a .zip archive, and --source {source} is a folder.")
        elif not (source.is_file() and source.suffix.lower() == ".zip"):
            raise DataError(f"--source {source} is a file, not a BEIR folder or a .zip archive of one.")
    for folder in (dest, *dest.parents):  # the first one that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == dest else f"lies under {folder}, which is a file"
                raise DataError(f"--dest {dest} {where}, not a folder.")
            break
    target = dest / name
    if target.exists() and not target.is_dir():
        raise DataError(f"{target} exists and is a file, not a BEIR folder; move it aside or choose another --dest.")


def _md5_of(path: Path) -> str:
    """The md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, archive: Path) -> str:
    """Stream ``url`` into ``archive`` (at most MAX_DOWNLOAD_BYTES) and return the md5 of the bytes received."""
    from tqdm import tqdm

    def failed(err: Exception) -> DataError:
        return DataError(f"could not download {url} ({err}); offline, pass --source with a local BEIR folder "
                         f"or .zip.")

    digest, size = hashlib.md5(), 0
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (OSError, http.client.HTTPException) as err:
        raise failed(err) from None
    with response, open(archive, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {archive.stem}") as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as err:  # e.g. the connection dropped midway
                    raise failed(err) from None
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise DataError(f"{url} sends more than {MAX_DOWNLOAD_BYTES:,} bytes; the download was stopped "
                                    f"and nothing was changed.")
                digest.update(chunk)
                out.write(chunk)  # an OSError here is the destination's, reported by fetch
                bar.update(len(chunk))
    return digest.hexdigest()


def _unpack(archive: Path, label: str, workdir: Path) -> Path:
    """Extract ``archive`` (named ``label`` in errors) into ``workdir/unzipped`` and return the one BEIR folder in it;
    a member with an absolute path or a '..' component, or more than MAX_UNZIPPED_BYTES in all, is refused first."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                path = member.filename.replace("\\", "/")
                if path.startswith("/") or re.match(r"[A-Za-z]:", path) or ".." in PurePosixPath(path).parts:
                    raise DataError(f"{label} holds a member with an unsafe path ({member.filename!r}); nothing was "
                                    f"extracted.")
            total = sum(member.file_size for member in members)
            if total > MAX_UNZIPPED_BYTES:
                raise DataError(f"{label} would unpack to {total:,} bytes, more than the {MAX_UNZIPPED_BYTES:,} "
                                f"allowed; nothing was extracted.")
            zf.extractall(workdir / "unzipped")
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"{label} is not a readable zip archive ({err}).") from None
    found = [p.parent for p in (workdir / "unzipped").rglob("corpus.jsonl")]
    if len(found) != 1:
        raise DataError(f"{label} does not unpack to one BEIR folder (found {len(found)} corpus.jsonl files).")
    return found[0]


def _archive(name: str, source: Path | None, expected: str | None, workdir: Path) -> Path:
    """Download ``name`` (or take the .zip ``source``) into ``workdir``, check its md5 against ``expected`` (when
    known), unpack it and return the BEIR folder inside."""
    if source is None:
        label = BEIR_URL.format(name=name)
        archive = workdir / f"{name}.zip"
        actual = _download(label, archive)
    else:
        label, archive = str(source), source
        try:
            actual = _md5_of(source)
        except OSError as err:
            raise DataError(f"could not read --source {source} ({_os_reason(err)}).") from None
    if expected and actual != expected:
        raise DataError(f"{label} has md5 {actual}, not the expected {expected}; it was not unpacked and nothing "
                        f"was changed.")
    folder = _unpack(archive, label, workdir)
    if source is None:
        archive.unlink()  # the unpacked copy is all that is needed from here on
    return folder


def _os_reason(err: OSError) -> str:
    """The OS's reason for an OSError, e.g. 'No space left on device' (the first one of a shutil.Error)."""
    if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) and err.args[0]:
        return str(err.args[0][0][-1])
    return err.strerror or str(err)


def fetch(name: str, dest: str | Path = "data", source: str | Path | None = None, force: bool = False,
          md5: str | None = None) -> Path:
    """Make ``dest/name`` a validated BEIR folder, from ``source`` if given, else from the BEIR download address.

    ``source`` is a BEIR folder, or a .zip of one (e.g. downloaded by hand). A download, and a .zip of a name in
    BEIR_MD5, must have the published md5; ``md5`` gives the checksum of a name not in the table (a download of
    such a name without ``md5`` is refused). Nothing is unpacked before the archive's checksum has been verified,
    and nothing is left behind when a step fails: no temporary folder, no folder that fetch made, and an existing
    ``dest/name`` as it was (an OSError while writing becomes a DataError naming the folder and the OS's reason).

    With ``force`` an existing folder's data set files (corpus.jsonl, queries.jsonl, qrels/) are replaced by the
    source's; everything else in it, e.g. ``negatives/`` written by ``retrieval_lab.mine`` and
    ``retrieval_lab.score``, is copied into the new folder (over a same-named file of the source). The old folder
    stays in place until the new one is complete, so a failed copy leaves it as it was.
    """
    dest, source = Path(dest), (Path(source) if source is not None else None)
    _check_arguments(name, dest, source, md5)
    expected = expected_md5(name, md5)
    from_folder = source is not None and source.is_dir()
    if source is None and expected is None:
        raise DataError(f"there is no published md5 for {name!r} (known: {', '.join(sorted(BEIR_MD5))}); pass "
                        f"--md5 HEX to download it anyway, or --source with a local BEIR folder or .zip.")
    target = dest / name
    if target.exists() and not force:
        if from_folder and (differs := first_difference(target, source)):
            raise DataError(f"{target} already holds a copy of {name} whose {differs} differs from {source}'s; "
                            f"nothing was changed (--force replaces its data set files and keeps the rest).")
        print(validate(target))
        same = f", the same as {source}" if from_folder else ""
        print(f"{target} already present{same} (use --force to replace it).")
        return target
    made = [p for p in (dest, *dest.parents) if not p.exists()]  # removed again, deepest first, if fetch fails
    done = False
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
            tmp = Path(tmp)
            origin = source if from_folder else _archive(name, source, expected, tmp)
            summary = validate(origin)  # nothing is put in place unless the source is sound
            staged = tmp / "staged"
            if from_folder:
                shutil.copytree(origin, staged, ignore=shutil.ignore_patterns("*.zip"))
            else:
                origin.rename(staged)  # unpacked in the temporary folder already: no second copy
            if target.exists():
                for kept in sorted(target.iterdir()):  # user outputs (negatives/, ...) travel into the new copy
                    if kept.name in DATA_SET_FILES:
                        continue
                    if kept.is_dir():
                        shutil.copytree(kept, staged / kept.name, symlinks=True, dirs_exist_ok=True)
                    else:
                        shutil.copy2(kept, staged / kept.name, follow_symlinks=False)
                old = tmp / "old"
                target.rename(old)  # the swap is two renames; the old folder goes only with the temporary directory
                try:
                    staged.rename(target)
                except OSError:
                    old.rename(target)
                    raise
            else:
                staged.rename(target)  # appears whole or not at all
        done = True
    except OSError as err:
        raise DataError(f"could not write {target} ({_os_reason(err)}); nothing was changed.") from None
    finally:
        if not done:
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break
    print(summary.replace(str(origin), str(target), 1))
    return target
