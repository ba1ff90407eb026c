"""Put a BEIR data set in place: download it from its public address, or copy a local folder when offline."""
from __future__ import annotations

import filecmp
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from retrieval_lab.data.beir import BeirDataset, available_splits
from retrieval_lab.errors import DataError

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
DATA_SET_FILES = ("corpus.jsonl", "queries.jsonl", "qrels")  # what fetch --force replaces in an existing folder


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


def _download(name: str, workdir: Path) -> Path:
    url = BEIR_URL.format(name=name)
    archive = workdir / f"{name}.zip"
    try:
        from tqdm import tqdm

        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as err:
        raise DataError(f"could not download {url} ({err}); offline, pass --source with a local BEIR folder.") from None
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(workdir / "unzipped")
    found = [p.parent for p in (workdir / "unzipped").rglob("corpus.jsonl")]
    if len(found) != 1:
        raise DataError(f"{url} does not unpack to one BEIR folder.")
    return found[0]


def fetch(name: str, dest: str | Path = "data", source: str | Path | None = None, force: bool = False) -> Path:
    """Make ``dest/name`` a validated BEIR folder, from ``source`` if given, else from the BEIR download address.

    With ``force`` an existing folder's data set files (corpus.jsonl, queries.jsonl, qrels/) are replaced by the
    source's; everything else in it, e.g. ``negatives/`` written by ``retrieval_lab.mine`` and
    ``retrieval_lab.score``, is copied into the new folder (over a same-named file of the source). The old folder
    stays in place until the new one is complete, so a failed copy leaves it as it was.
    """
    target = Path(dest) / name
    if target.exists() and not force:
        if source is not None and (differs := first_difference(target, Path(source))):
            raise DataError(f"{target} already holds a copy of {name} whose {differs} differs from {source}'s; "
                            f"nothing was changed (--force replaces its data set files and keeps the rest).")
        print(validate(target))
        same = f", the same as {source}" if source is not None else ""
        print(f"{target} already present{same} (use --force to replace it).")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
        tmp = Path(tmp)
        origin = Path(source) if source else _download(name, tmp)
        summary = validate(origin)  # nothing is put in place unless the source is sound
        staged = tmp / "staged"
        shutil.copytree(origin, staged, ignore=shutil.ignore_patterns("*.zip"))
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
    print(summary.replace(str(origin), str(target), 1))
    return target
