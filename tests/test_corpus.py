"""Corpora: files, globs, saved datasets, hub ids (offline: one-line error) and the embedded default."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
from data_helpers import corpus_texts, write_corpus

from sparsecode.data.corpus import DEFAULT_CORPUS, open_corpus, stdlib_corpus
from sparsecode.errors import SparsecodeError


def one_line(e) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_folder_and_glob(tmp_path):
    folder = write_corpus(tmp_path / "c", docs=6)
    corpus = open_corpus(str(folder))
    docs = list(corpus.docs())
    assert [i for i, _ in docs] == list(range(6)) and [t for _, t in docs] == corpus_texts(folder)
    assert list(corpus.docs(4)) == docs[4:]
    assert [t for _, t in open_corpus(str(folder / "a*.txt")).docs()] == corpus_texts(folder)[:3]
    assert [t for _, t in open_corpus(str(folder / "b.jsonl")).docs()] == corpus_texts(folder)[3:]
    assert corpus.fingerprint() == open_corpus(str(folder)).fingerprint()


def test_jsonl_text_field(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"body": "hello there"}) + "\n\n" + json.dumps({"body": "again"}) + "\n")
    assert [t for _, t in open_corpus(str(f), text_field="body").docs()] == ["hello there", "again"]
    with pytest.raises(SparsecodeError, match="no text field 'text'") as e:
        open_corpus(str(f))
    assert "body" in one_line(e)
    f.write_text("{not json\n")
    with pytest.raises(SparsecodeError, match="x.jsonl:1"):
        open_corpus(str(f))


def test_empty_and_missing(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(SparsecodeError, match="empty") as e:
        open_corpus(str(tmp_path / "e"))
    one_line(e)
    (tmp_path / "e" / "blank.txt").write_text("\n  \n")
    with pytest.raises(SparsecodeError, match="empty"):
        open_corpus(str(tmp_path / "e"))
    with pytest.raises(SparsecodeError, match="not found"):
        open_corpus(str(tmp_path / "nothing.txt"))
    with pytest.raises(SparsecodeError, match="not .txt or .jsonl"):
        (tmp_path / "x.csv").write_text("a,b")
        open_corpus(str(tmp_path / "x.csv"))


def test_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one doc", "two docs"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert [t for _, t in open_corpus(str(tmp_path / "ds")).docs()] == ["one doc", "two docs"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b c"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(open_corpus(str(tmp_path / "dd")).docs()) == [(0, "a b c")]
    with pytest.raises(SparsecodeError, match="no split 'validation'"):
        open_corpus(str(tmp_path / "dd"), split="validation")


def test_hub_dataset_offline_is_one_line(tmp_path):
    # a fresh process: the hub libraries read HF_HUB_OFFLINE when first imported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = ("import sys; from sparsecode.data.corpus import open_corpus\n"
            "for spec in sys.argv[1:]:\n"
            "    try: open_corpus(spec)\n"
            "    except Exception as e: print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code, "hf:somebody/no-such-corpus", "somebody/no-such-corpus:cfg"],
                         env=env, capture_output=True, text=True, check=True, cwd=tmp_path).stdout.splitlines()
    assert len(out) == 2 and all(line.startswith("SparsecodeError cannot load dataset 'somebody/no-such-corpus")
                                 for line in out), out


def test_stdlib_builder_keeps_docstrings_and_prose(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "b.py").write_text(textwrap.dedent('''
        """Module b explains things."""
        # This comment block is a real English sentence about the code below.
        TABLE = 1  # 0x33 -> DIGIT THREE
        def f():
            """Return one, always."""
            return 1
        '''))
    (root / "a.py").write_text('def g():\n    "Docstring of g."\n')
    (root / "broken.py").write_text("def (:\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "z.py").write_text('"""Not the standard library."""\n')
    out = stdlib_corpus(root, tmp_path / "out.jsonl")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    def digest(name: str) -> bytes:
        return hashlib.sha256(name.encode()).digest()

    assert [r["source"] for r in lines] == sorted(["a.py", "pkg/b.py"], key=digest)  # in hash order, not by path
    texts = {r["source"]: r["text"] for r in lines}
    assert texts["pkg/b.py"] == ("Module b explains things.\n\nThis comment block is a real English sentence "
                                 "about the code below.\n\nReturn one, always.")
    assert stdlib_corpus(root, tmp_path / "again.jsonl").read_bytes() == out.read_bytes()


@pytest.mark.slow
def test_default_corpus_has_a_million_tokens():
    from transformers import AutoTokenizer

    from sparsecode.model import model_path

    tok = AutoTokenizer.from_pretrained(model_path("minilm"), local_files_only=True)
    texts = [t for _, t in open_corpus(DEFAULT_CORPUS).docs()]
    assert len(texts) > 1000
    assert sum(len(ids) for ids in tok(texts, add_special_tokens=False, verbose=False)["input_ids"]) > 1_000_000
