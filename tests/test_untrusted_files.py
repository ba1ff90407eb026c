"""Files a user or another machine can write never run code when the project reads them: a checkpoint given as
resume=<path> or found as a run folder's last.ckpt, a token cache file, a negatives or teacher-scores file. Each crafted
file asks the unpickler to call ``open(marker, "w")``; the marker must not appear, and the run stops with one
sentence (or, for a cache, warns and rebuilds it)."""
from __future__ import annotations

import builtins
import pickle

import numpy as np
import pytest
import torch

from conftest import run_module


class Payload:
    """Unpickled, it would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def crafted_checkpoint(path, marker):
    """A real torch.save archive with a training checkpoint's keys, plus the payload."""
    torch.save({"global_step": 3, "state_dict": {}, "loops": {}, "callbacks": {}, "payload": Payload(marker)}, path)
    return path


def train(tiny_model, beir_folder, run_dir, *extra):
    return run_module("retrieval_lab.train", "data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}",
                      "logger=csv", "trainer.max_steps=2", "batch_size=4", f"hydra.run.dir={run_dir}", *extra)


def test_a_crafted_checkpoint_given_as_resume_does_not_run(tiny_model, beir_folder, tmp_path):
    path = crafted_checkpoint(tmp_path / "shared.ckpt", tmp_path / "marker")
    result = train(tiny_model, beir_folder, tmp_path / "run", f"resume={path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: resume={path}: {path} was not loaded: it asks to import io.open, and a checkpoint holds only tensors "
        "and plain values (loading Python objects could run code).")
    assert not (tmp_path / "marker").exists()
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "before").exists()


def test_a_crafted_last_checkpoint_in_a_run_folder_does_not_run(tiny_model, beir_folder, tmp_path):
    """resume=auto (the default) picks up <run dir>/checkpoints/last.ckpt, e.g. in a folder shared between machines."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    last = crafted_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "marker")
    result = train(tiny_model, beir_folder, tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "was not loaded: it asks to import io.open" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "marker").exists() and last.is_file()  # the file stays for its owner to look at


def test_lightning_reads_checkpoints_without_running_code(tmp_path):
    """The checkpoint plugin Lightning resumes through refuses the payload too (not only the resume check before it),
    whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says."""
    from retrieval_lab.callbacks import AtomicCheckpointIO
    from retrieval_lab.errors import ConfigError

    path = crafted_checkpoint(tmp_path / "last.ckpt", tmp_path / "marker")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        with pytest.raises(ConfigError, match="was not loaded: it asks to import io.open"):
            AtomicCheckpointIO().load_checkpoint(path)
    assert not (tmp_path / "marker").exists()
    plain = {"global_step": 2, "state_dict": {"w": torch.ones(2)}, "random": (3, tuple(range(5)), None)}
    AtomicCheckpointIO().save_checkpoint(plain, tmp_path / "good.ckpt")
    loaded = AtomicCheckpointIO().load_checkpoint(tmp_path / "good.ckpt")
    assert loaded["global_step"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_the_checkpoints_training_writes_load_without_pickled_objects(tiny_model, beir_folder, tmp_path):
    """What makes the refusal affordable: every checkpoint a run writes (MoCo's queue, the random states, the ANCE
    table, the settings) holds only tensors and plain values, so weights_only loading reads it whole."""
    result = train(tiny_model, beir_folder, tmp_path / "run", "negatives=moco", "negatives.module.queue_size=6",
                   "checkpoint.every_n_steps=1", "eval.before=false", "eval.after=false", "save_model=false")
    assert result.returncode == 0, result.stderr[-2000:]
    for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, weights_only=True)
        assert state["global_step"] in (1, 2) and "retrieval_lab_settings" in state


def test_a_token_cache_file_holding_pickled_objects_is_not_unpickled(tiny_model, tmp_path):
    """np.load without allow_pickle: the object array is refused, the texts are tokenised again and the file
    rewritten with plain arrays."""
    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab.tokenization import TokenCache, rust_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    texts = ["a protein study", "gene and virus"]
    cache = TokenCache(folder=tmp_path / "tokens")
    file = cache.file(rust_tokenizer(tokenizer, 16), texts)
    file.parent.mkdir(parents=True)
    payload = np.empty(1, dtype=object)
    payload[0] = Payload(tmp_path / "marker")
    np.savez(file, order=payload, flat=payload, offsets=payload)
    with pytest.warns(UserWarning, match="could not be read .*allow_pickle"):
        chunks = list(cache.stream(tokenizer, texts, 16))
    assert not (tmp_path / "marker").exists()
    got = {int(i): list(x) for idx, ids in chunks for i, x in zip(idx, ids)}
    assert got == dict(enumerate(tokenizer(texts, truncation=True, max_length=16)["input_ids"]))
    with np.load(file) as rewritten:  # allow_pickle=False: plain arrays now
        assert rewritten["order"].dtype.kind == "i"


@pytest.mark.parametrize("reader", ["negatives", "qrels", "corpus"])
def test_a_pickle_where_a_text_file_belongs_is_refused_by_line(reader, beir_folder, tmp_path):
    """Negatives, teacher scores and data files are read as UTF-8 text and JSON only: a pickle in their place gets
    the line-numbered sentence any malformed file gets."""
    import shutil

    from retrieval_lab.data.beir import BeirDataset
    from retrieval_lab.data.negatives import read_negatives
    from retrieval_lab.errors import DataError

    folder = tmp_path / "beir"
    shutil.copytree(beir_folder, folder)
    crafted = pickle.dumps(Payload(tmp_path / "marker"))
    target = {"negatives": tmp_path / "neg.jsonl", "qrels": folder / "qrels" / "test.tsv",
              "corpus": folder / "corpus.jsonl"}[reader]
    target.write_bytes(crafted)
    with pytest.raises(DataError, match=rf"{target} line 1 "):
        if reader == "negatives":
            read_negatives(target, BeirDataset(folder), BeirDataset(folder).qrels("train"))
        else:
            BeirDataset(folder).split("test")
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("state,why", [
    ({"global_step": "abc"}, "it has no global_step that is a whole number"),
    ({"state_dict": {}}, "it has no global_step that is a whole number"),
    ([1, 2, 3], "it has no global_step that is a whole number"),
    ({"global_step": 2, "retrieval_lab_settings": [1, 2]}, "its retrieval_lab_settings are not names and values"),
])
def test_a_checkpoint_of_plain_values_but_the_wrong_shape_is_one_sentence(state, why, tmp_path):
    from retrieval_lab.errors import ConfigError
    from retrieval_lab.files import load_checkpoint

    torch.save(state, tmp_path / "odd.ckpt")
    with pytest.raises(ConfigError, match=rf"^resume=auto: {tmp_path / 'odd.ckpt'} is not a .*\({why}\)\.$"):
        load_checkpoint(tmp_path / "odd.ckpt", "resume=auto")


@pytest.mark.parametrize("damage", ["other ids", "out of the vocabulary", "offsets"])
def test_a_token_cache_file_whose_ids_are_not_the_tokenizers_is_tokenised_again(damage, tiny_model, tmp_path):
    """A cache file from another machine, or a damaged one, with plain arrays of the right shapes: its ids are
    checked (range, offsets, a sample tokenised again), so wrong ids never reach the model."""
    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab.tokenization import TokenCache

    tokenizer = load_tokenizer(str(tiny_model))
    texts = [f"text number {i} about {w}" for i, w in enumerate(["genes", "cells", "virus", "liver"] * 10)]
    expected = dict(enumerate(tokenizer(texts, truncation=True, max_length=16)["input_ids"]))
    list(TokenCache(folder=tmp_path).stream(tokenizer, texts, 16))
    file = next(tmp_path.glob("tokens-*.npz"))
    with np.load(file) as saved:
        order, flat, offsets = saved["order"], saved["flat"].copy(), saved["offsets"].copy()
    if damage == "other ids":
        flat[:] = 1037  # in the vocabulary, and wrong
    elif damage == "out of the vocabulary":
        flat[0] = 10 ** 6
    else:
        offsets[1] = offsets[-1] + 5
    np.savez(file, order=order, flat=flat, offsets=offsets)
    with pytest.warns(UserWarning, match="could not be read"):
        got = {int(i): list(x) for idx, ids in TokenCache(folder=tmp_path).stream(tokenizer, texts, 16)
               for i, x in zip(idx, ids)}
    assert got == expected
