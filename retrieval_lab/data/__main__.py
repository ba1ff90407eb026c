"""`python -m retrieval_lab.data fetch scifact [--source DIR|ZIP] [--md5 HEX]` and
`python -m retrieval_lab.data check DIR`."""
from __future__ import annotations

import argparse
from pathlib import Path

from retrieval_lab.data.fetch import BEIR_MD5, fetch, validate
from retrieval_lab.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrieval_lab.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser(
        "fetch", help="download a BEIR data set (or copy a local folder or .zip) into DEST/NAME",
        description="Download a BEIR data set into DEST/NAME, checking the archive's md5 before unpacking it, or "
                    "put a local BEIR folder or .zip there; every file is validated first. Downloads of the "
                    f"published data sets ({', '.join(sorted(BEIR_MD5))}) are checked against the md5 that BEIR "
                    "publishes; any other name is downloaded only with an explicit --md5.")
    get.add_argument("name", help="data set name, e.g. scifact, nfcorpus, fiqa (letters, digits, '.', '_', '-'); "
                                  "it names the folder DEST/NAME")
    get.add_argument("--source", type=Path, metavar="DIR|ZIP",
                     help="local BEIR folder to copy, or a .zip of one (e.g. downloaded by hand) to check against "
                          "the published md5 of NAME, when known, and unpack, instead of downloading")
    get.add_argument("--md5", metavar="HEX",
                     help="the md5 the archive must have: needed to download a NAME without a published md5, "
                          "checked for a --source .zip; for a published name it must equal BEIR's")
    get.add_argument("--dest", type=Path, default=Path("data"), help="where data sets live (default: data)")
    get.add_argument("--force", action="store_true", help="replace an existing copy")
    check = sub.add_parser("check", help="validate every file of a BEIR folder")
    check.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.command == "fetch":
            fetch(args.name, args.dest, args.source, args.force, args.md5)
        else:
            print(validate(args.folder))


if __name__ == "__main__":
    main()
