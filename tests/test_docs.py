"""Every `python -m retrieval_lab.<entry point> key=value ...` command in the READMEs, the experiment scripts and
the Makefile composes with the configs in conf/ (a renamed or missing key would make a documented command fail)."""
from __future__ import annotations

import re
import shlex

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "experiments").glob("**/*.md")),
        *sorted((ROOT / "experiments").glob("**/*.sh"))]
COMMAND = re.compile(r"python -m retrieval_lab\.(train|evaluate|mine|score)((?:[ \t]+(?:\\\n[ \t]*)?[^ \t\n`|#]+)*)")


def documented_commands() -> list[tuple[str, str, tuple[str, ...]]]:
    commands = {}
    for path in DOCS:
        for match in COMMAND.finditer(path.read_text()):
            args = re.sub(r"<[^>]*>|\$\{?\w+\}?", "x", match.group(2).replace("\\\n", " "))  # placeholders
            try:
                words = shlex.split(args)
            except ValueError:  # a shell construct (a trailing backslash, $(...)): plain words are enough here
                words = args.split()
            overrides = tuple(a for a in words if "=" in a and not a.startswith("-"))
            commands.setdefault((match.group(1), overrides), path.name)
    return [(where, entry, overrides) for (entry, overrides), where in commands.items()]


def test_the_documents_hold_commands():
    assert len(documented_commands()) > 30


@pytest.mark.parametrize("where, entry, overrides", documented_commands())
def test_documented_command_composes(where, entry, overrides):
    from hydra import compose, initialize_config_dir

    # a sweep (key=a,b) composes its first value
    first = [a if "[" in a else re.sub(r"=([^,]*),.*", r"=\1", a) for a in overrides]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):  # hydra.* too (launchers: test extras)
        compose(config_name=entry, overrides=first, return_hydra_config=True)
