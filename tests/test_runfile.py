"""Reading TREC run files: bad input is one sentence naming the file and line."""
from __future__ import annotations

import re

import pytest

from retrieval_lab.errors import DataError
from retrieval_lab.retrieval.runfile import read_trec_run


def test_non_utf8_run_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.trec"
    path.write_bytes(b"q1 Q0 d1 1 2.5 x\nq1 Q0 d\xe9 2 1.5 x\n")  # Latin-1 'e acute' on line 2
    message = f"{path} line 2 is not valid UTF-8 (invalid continuation byte at byte 7)."  # byte 7 of the line
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        read_trec_run(path)


def test_run_file_faults_name_the_line(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d1 1 2.5 x\n\nq1 Q0 d2 2 x\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 3 has 5 fields, a TREC run line has 6\.$"):
        read_trec_run(path)
    path.write_text("q1 Q0 d1 1 2.5 x\nq2 Q0 d2 1 high x\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 2: score 'high' is not a number\.$"):
        read_trec_run(path)
    path.write_text("q1 Q0 d1 1 2.5 x\r\nq1 Q0 d2 2 -1e-3 x\r\n")
    assert read_trec_run(path) == {"q1": {"d1": 2.5, "d2": -0.001}}


def test_run_file_keeps_every_digit_of_the_scores(tmp_path):
    """Scores that differ below the 6th decimal (float32 cosines often do: here by one float32 step) keep their
    value and order through the file, so trec_eval on the file agrees with the metrics computed in memory."""
    import numpy as np

    from retrieval_lab.retrieval.runfile import write_trec_run

    close = np.float32(0.73456789)
    scores = {"d1": float(close), "d2": float(np.nextafter(close, np.float32(1))), "d3": 1 / 3, "d4": 2.5e-9}
    path = tmp_path / "run.trec"
    write_trec_run({"q1": scores}, path)
    assert read_trec_run(path) == {"q1": scores}
    assert [line.split()[2] for line in path.read_text().splitlines()] == ["d2", "d1", "d3", "d4"]
