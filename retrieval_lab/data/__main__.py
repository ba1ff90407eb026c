"""`python -m retrieval_lab.data fetch scifact [--source DIR]` and `python -m retrieval_lab.data check DIR`."""
from __future__ import annotations

import argparse
from pathlib import Path

from retrieval_lab.data.fetch import fetch, validate
from retrieval_lab.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrieval_lab.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help="download a BEIR data set (or copy a local folder) into DEST/NAME")
    get.add_argument("name", help="BEIR data set name, e.g. scifact, nfcorpus, fiqa")
    get.add_argument("--source", type=Path, help="local BEIR folder to use instead of downloading")
    get.add_argument("--dest", type=Path, default=Path("data"), help="where data sets live (default: data)")
    get.add_argument("--force", action="store_true", help="replace an existing copy")
    check = sub.add_parser("check", help="validate every file of a BEIR folder")
    check.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.command == "fetch":
            fetch(args.name, args.dest, args.source, args.force)
        else:
            print(validate(args.folder))


if __name__ == "__main__":
    main()
