"""Text corpora for harvesting: files, HF datasets on disk or on the hub, and the embedded default.

A corpus is an ordered, repeatable sequence of documents (strings). `open_corpus(spec)` understands:
`stdlib` (the default, below), a folder (every .txt / .jsonl file under it, sorted), a glob of such files,
a dataset saved with `datasets.Dataset.save_to_disk`, or a hub dataset id (`hf:owner/name[:config]`, or
a bare id that is not a local path), loaded with `datasets.load_dataset`.

The embedded default `stdlib` is real English text that needs no download and no install: from every
.py file of the running Python's standard library, one document per file made of its docstrings
(`ast.get_docstring` of the module, classes and functions) and its prose comment blocks (at least 6 words,
mostly alphabetic: this drops code tables such as `0x33 -> DIGIT THREE`), and one document per topic of
`pydoc_data.topics` (the language reference that `help()` shows). Documents are ordered by a hash of their
name, not by path: a store's held-out tail is then a random sample of documents, where the sorted order
put the test suite, tkinter, xml and the language reference there, away from the training rows. On CPython 3.11
that is about 1.16M MiniLM tokens (590k from docstrings, 447k from comments, 128k from the topics); the
docstrings alone (590k) fell short of the 1M wanted. It is built once (about a minute on 2 cores) into
`~/.cache/sparsecode/corpus/` (or `$SPARSECODE_CACHE/corpus/`) with an atomic write.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SparsecodeError
from ..files import atomic_write

DEFAULT_CORPUS = "stdlib"
TEXT_SUFFIXES = (".txt", ".jsonl")


def cache_dir() -> Path:
    """Where built corpora are kept: $SPARSECODE_CACHE or ~/.cache/sparsecode."""
    root = os.environ.get("SPARSECODE_CACHE") or Path.home() / ".cache" / "sparsecode"
    return Path(root)


@dataclass
class Corpus:
    """An ordered list of text sources; `docs(start)` yields the documents from index `start` on."""

    name: str
    files: list[Path] | None = None  # .txt (one document per file) or .jsonl (one per line)
    dataset: Any = None  # an object indexable by row giving dicts (a `datasets.Dataset`)
    text_field: str = "text"

    def docs(self, start: int = 0) -> Iterator[tuple[int, str]]:
        """(index, text) of each document from index `start` on (the index counts every document)."""
        if self.dataset is not None:
            for i in range(start, len(self.dataset)):
                yield i, self._field(self.dataset[i], f"{self.name} row {i}")
            return
        i = 0
        for path in self.files or []:
            if path.suffix == ".txt":
                if i >= start:
                    yield i, path.read_text(encoding="utf-8", errors="replace")
                i += 1
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if i >= start:
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise SparsecodeError(f"{path}:{lineno}: not valid JSON: {e}") from None
                        yield i, self._field(record, f"{path}:{lineno}")
                    i += 1

    def fingerprint(self) -> str:
        """A short description that changes when the corpus does (saved in a store's manifest)."""
        if self.dataset is not None:
            return str(getattr(self.dataset, "_fingerprint", "")) or f"{len(self.dataset)} rows"
        stats = [f"{p.name}:{p.stat().st_size}" for p in self.files or []]
        return hashlib.sha256("\n".join(stats).encode()).hexdigest()[:16]

    def _field(self, record: Any, where: str) -> str:
        if isinstance(record, str):
            return record
        if not isinstance(record, dict) or self.text_field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise SparsecodeError(f"{where}: no text field {self.text_field!r} (has: {keys}); "
                                  f"pick one with text_field")
        return str(record[self.text_field])


def open_corpus(spec: str = DEFAULT_CORPUS, text_field: str = "text", split: str = "train") -> Corpus:
    """The corpus named by `spec` (see the module docstring); raises SparsecodeError if it has no text."""
    if spec == DEFAULT_CORPUS:
        corpus = Corpus(DEFAULT_CORPUS, files=[stdlib_corpus()], text_field="text")
    elif spec.startswith("hf:"):
        corpus = _hub_dataset(spec[3:], text_field, split)
    elif Path(spec).is_dir() and _is_saved_dataset(Path(spec)):
        corpus = _disk_dataset(Path(spec), text_field, split)
    elif Path(spec).is_dir():
        files = sorted(p for p in Path(spec).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        corpus = Corpus(str(Path(spec).resolve()), files=files, text_field=text_field)
    elif Path(spec).is_file():
        check_suffix(Path(spec))
        corpus = Corpus(str(Path(spec).resolve()), files=[Path(spec)], text_field=text_field)
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        for p in files:
            check_suffix(p)
        corpus = Corpus(spec, files=files, text_field=text_field)
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+)?", spec) and Path(spec).suffix not in TEXT_SUFFIXES:
        corpus = _hub_dataset(spec, text_field, split)
    else:
        raise SparsecodeError(f"corpus not found: {spec!r} is no file, folder, glob or dataset id")
    if not any(text.strip() for _, text in corpus.docs()):
        raise SparsecodeError(f"the corpus {spec!r} is empty: it has no text")
    return corpus


def check_suffix(path: Path) -> None:
    if path.suffix not in TEXT_SUFFIXES:
        raise SparsecodeError(f"corpus file {path} is not .txt or .jsonl")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _import_datasets(spec: str):
    try:
        import datasets
    except ImportError:
        raise SparsecodeError(f"cannot load dataset {spec!r}: it needs the `datasets` package "
                              f"(pip install 'sparsecode[datasets]')") from None
    return datasets


def _pick_split(ds: Any, split: str, name: str) -> Any:
    if isinstance(ds, dict):  # a DatasetDict
        splits = list(ds.keys())
        if split not in splits:
            raise SparsecodeError(f"dataset {name} has no split {split!r}; it has: {', '.join(splits)}")
        return ds[split]
    return ds


def _disk_dataset(path: Path, text_field: str, split: str) -> Corpus:
    datasets = _import_datasets(str(path))
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as e:
        raise SparsecodeError(f"cannot load the dataset saved in {path}: {_first_line(e)}") from None
    return Corpus(str(path.resolve()), dataset=_pick_split(ds, split, str(path)), text_field=text_field)


def _hub_dataset(spec: str, text_field: str, split: str) -> Corpus:
    datasets = _import_datasets(spec)
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, missing dataset, bad config: all one line for the user
        raise SparsecodeError(f"cannot load dataset {spec!r} from the hub: {_first_line(e)}") from None
    return Corpus(f"hf:{spec}", dataset=ds, text_field=text_field)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


# --- the embedded default --------------------------------------------------------------------------
def stdlib_corpus(root: Path | None = None, out: Path | None = None) -> Path:
    """Build (once) and return the .jsonl file of the `stdlib` corpus."""
    version = ".".join(map(str, sys.version_info[:3]))
    out = out or cache_dir() / "corpus" / f"stdlib-{version}-hashed.jsonl"
    if out.is_file():
        return out
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    with ProcessPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        texts = list(pool.map(file_text, files, chunksize=16))
    lines = [json.dumps({"source": str(p.relative_to(root)), "text": t}) for p, t in zip(files, texts, strict=True)
             if t]
    if root == Path(sysconfig.get_paths()["stdlib"]):
        from pydoc_data.topics import topics

        lines += [json.dumps({"source": f"pydoc_data.topics:{k}", "text": topics[k].strip()})
                  for k in sorted(topics)]
    if not lines:
        raise SparsecodeError(f"no docstrings found under {root}")
    lines.sort(key=lambda line: hashlib.sha256(json.loads(line)["source"].encode()).digest())
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "".join(line + "\n" for line in lines).encode())
    return out


def file_text(path: Path) -> str:
    """The docstrings and prose comment blocks of one Python file, in source order."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    parts: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and node.body:
                parts.append((node.body[0].lineno, doc.strip()))
    parts += _comment_blocks(source)
    return "\n\n".join(text for _, text in sorted(parts, key=lambda p: p[0]))


def _comment_blocks(source: str) -> list[tuple[int, str]]:
    blocks, block, start = [], [], 0
    blank = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                start = start if block else tok.start[0]
                block.append(tok.string.lstrip("#").strip())
            elif tok.type not in blank and block:
                blocks.append((start, " ".join(b for b in block if b)))
                block = []
    except (tokenize.TokenError, SyntaxError):
        pass
    return [(line, text) for line, text in blocks if _prose(text)]


def _prose(text: str) -> bool:
    words = text.split()
    return len(words) >= 6 and sum(w.isalpha() for w in words) >= 0.7 * len(words)

