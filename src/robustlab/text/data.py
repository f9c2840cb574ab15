"""Text data: readers for the formats users have, a word-level tokenizer, and fixed splits.

- SST-2 style TSV: a header naming `sentence` and `label` columns (GLUE's files), or two columns
  (sentence, label) without a header.
- AG News style CSV: no header; class index (1-based), title, description; text = title + description.
- IMDB style folders: one sub-folder per class (aclImdb's `neg`, `pos`), one text file per example.
- The offline Debian corpus (`robustlab.text.corpus`).

Everything becomes a `TextSet`: int64 token ids, batch × tokens, right-padded with `pad_id`, and int64
labels. The vocabulary is built from the training split only. The validation split is carved out of
the training data by a seeded permutation (seed 0; 10% of it, at most 5,000), the robustlab protocol's
rule, so that choices never look at the test set. The corpus ships its own fixed splits.
"""
from __future__ import annotations

import contextlib
import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from robustlab.errors import RobustlabError, check_choice

PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with an apostrophe suffix such as n't or 's), numbers and single punctuation marks."""
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


class Vocab:
    """Word ↔ id. Id 0 is padding, 1 the unknown word; the rest by descending training frequency
    (ties alphabetically), so the same training data always gives the same ids."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        if self.tokens[:2] != [PAD, UNK]:
            raise RobustlabError(f"a vocabulary starts with {PAD!r} and {UNK!r}")
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id = 0, 1

    @classmethod
    def build(cls, texts, min_freq: int = 2, max_size: int = 20_000) -> "Vocab":
        counts = Counter(t for text in texts for t in tokenize(text))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK, *words[:max(max_size - 2, 0)]])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, max_len: int) -> list[int]:
        """At most `max_len` ids; never empty (an empty text is one unknown word), so no row is all padding."""
        ids = [self.index.get(t, self.unk_id) for t in tokenize(text)[:max_len]]
        return ids or [self.unk_id]

    def encode_all(self, texts, max_len: int) -> torch.Tensor:
        return pad_rows([self.encode(t, max_len) for t in texts], self.pad_id)


def pad_rows(rows, pad_id: int) -> torch.Tensor:
    ids = torch.full((len(rows), max((len(r) for r in rows), default=1)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids


@dataclass
class TextSet:
    ids: torch.Tensor      # int64, N × L, right-padded with pad_id
    labels: torch.Tensor   # int64, N
    pad_id: int = 0

    def __post_init__(self):
        if self.ids.dim() != 2 or self.ids.dtype != torch.long or self.ids.shape[0] != len(self.labels):
            raise RobustlabError(f"TextSet needs int64 ids of shape N × L and N labels, got {self.ids.dtype} "
                                 f"{tuple(self.ids.shape)} and {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "TextSet":
        """The first `n` examples (all of them if n >= len)."""
        if n < 0:
            raise RobustlabError(f"subset size must be >= 0, got {n}")
        return self.select(torch.arange(min(n, len(self))))

    def select(self, index: torch.Tensor) -> "TextSet":
        """These rows, with the columns that are padding in all of them dropped."""
        ids = self.ids[index]
        width = int((ids != self.pad_id).sum(1).max()) if len(ids) else 1
        return TextSet(ids[:, :max(width, 1)], self.labels[index], self.pad_id)


@dataclass
class TextInfo:
    name: str
    num_classes: int
    class_names: tuple
    max_len: int
    augment: str = "none"  # the Trainer's field; text has no augmentation


@dataclass
class TextSplits:
    train: TextSet
    val: TextSet
    test: TextSet
    info: TextInfo
    vocab: Vocab = field(repr=False)


# -- readers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _utf8(path: Path):
    """The file opened for csv, with a byte that is not UTF-8 reported as one line, not a UnicodeDecodeError."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            yield f
    except UnicodeDecodeError as exc:
        raise RobustlabError(f"{path} is not UTF-8 text (it holds byte {exc.object[exc.start]:#x}); "
                             "convert it, e.g. with iconv -t utf-8") from None


def read_sst2(path) -> tuple[list[str], list[int]]:
    """SST-2 / GLUE style TSV: columns `sentence` and `label` (any order) under a header, or
    sentence<TAB>label rows without one."""
    path = Path(path)
    with _utf8(path) as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    if not rows:
        raise RobustlabError(f"{path} holds no rows")
    header = [h.strip().lower() for h in rows[0]]
    if "sentence" in header:
        if "label" not in header:
            raise RobustlabError(f"{path} has no label column (GLUE's test.tsv is unlabelled; use dev.tsv)")
        si, li, rows = header.index("sentence"), header.index("label"), rows[1:]
    else:
        si, li = 0, 1
    try:
        texts, labels = [r[si] for r in rows], [int(r[li]) for r in rows]
    except (IndexError, ValueError):
        raise RobustlabError(f"{path}: expected rows of sentence<TAB>label with an integer label") from None
    return texts, labels


def read_agnews(path) -> tuple[list[str], list[int]]:
    """AG News style CSV: class index from 1, title, description; no header. The text is title and
    description; AG News escapes line breaks as backslash-n, which become spaces."""
    path = Path(path)
    texts, labels = [], []
    with _utf8(path) as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            try:
                label = int(row[0]) - 1
            except (ValueError, IndexError):
                raise RobustlabError(f"{path}:{n}: expected class index,title,description") from None
            texts.append(" ".join(row[1:]).replace("\\n", " ").replace("\\", " "))
            labels.append(label)
    if not labels or min(labels) < 0:
        raise RobustlabError(f"{path}: no rows, or a class index below 1")
    return texts, labels


def read_folders(path, classes=None) -> tuple[list[str], list[int], tuple]:
    """IMDB style: `path/<class>/*.txt`; classes are the sub-folders in sorted order (neg, pos) unless
    given, less IMDB's `unsup` (unlabelled reviews). HTML line breaks (<br />) become spaces."""
    path = Path(path)
    folders = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != "unsup") if path.is_dir() else ()
    classes = tuple(classes or folders)
    if not classes:
        raise RobustlabError(f"{path} has no class sub-folders (expected e.g. {path}/neg and {path}/pos)")
    texts, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((path / name).glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="replace").replace("<br />", " "))
            labels.append(label)
    if not texts:
        raise RobustlabError(f"{path}: no .txt files in {', '.join(classes)}")
    return texts, labels, classes


AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
TEXT_DATASETS = ("debian-packages", "sst2", "ag-news", "imdb")


def _find(data_dir: Path, *names) -> Path:
    for name in names:
        if (data_dir / name).exists():
            return data_dir / name
    raise RobustlabError(f"{data_dir} has none of {', '.join(names)}")


def _raw_splits(name: str, data_dir) -> tuple[dict, tuple]:
    """{split: (texts, labels)} with train and test (and val when the source fixes it), and class names."""
    if name == "debian-packages":
        from robustlab.text.corpus import load_corpus
        return load_corpus(data_dir)
    if data_dir is None:
        raise RobustlabError(f"dataset {name} needs --data-dir (robustlab downloads no text data)")
    data_dir = Path(data_dir).expanduser()
    if name == "sst2":  # GLUE's test labels are hidden: its dev set is the test set here
        train, test = read_sst2(_find(data_dir, "train.tsv")), read_sst2(_find(data_dir, "dev.tsv", "test.tsv"))
        return {"train": train, "test": test}, ("negative", "positive")
    if name == "ag-news":
        return {"train": read_agnews(_find(data_dir, "train.csv")),
                "test": read_agnews(_find(data_dir, "test.csv"))}, AG_NEWS_CLASSES
    tr_texts, tr_labels, classes = read_folders(_find(data_dir, "train"))
    te_texts, te_labels, _ = read_folders(_find(data_dir, "test"), classes)
    return {"train": (tr_texts, tr_labels), "test": (te_texts, te_labels)}, tuple(classes)


def _check_labels(name: str, raw: dict, classes: tuple):
    """Labels a classifier can learn and be scored on: each was a traceback in the loss or the loop, or a model
    trained on without a word (a 1-class model at 100%, or an 8-class SST-2 model for a test label of 7)."""
    train = set(raw["train"][1])
    if not train:
        raise RobustlabError(f"the {name} training split holds no examples")
    if min(lbl for _, labels in raw.values() for lbl in labels) < 0:
        raise RobustlabError(f"the {name} data has a negative label; labels are class indices from 0")
    if len(train) < 2:
        only = next(iter(train))
        raise RobustlabError(f"the {name} training split has one class ({classes[only] if only < len(classes) else only}); "
                             "a classifier needs at least two")
    for split, (_, labels) in raw.items():
        if labels and max(labels) >= len(classes):
            raise RobustlabError(f"the {name} {split} split has label {max(labels)}, but {name} has {len(classes)} "
                                 f"classes ({', '.join(classes)})")


def load_text_dataset(name: str, data_dir=None, *, max_len: int = 64, min_freq: int = 2,
                      max_vocab: int = 20_000, vocab: Vocab | None = None) -> TextSplits:
    """Read a text dataset, build the vocabulary on its training split (or use `vocab`) and encode it."""
    check_choice("text dataset", name, TEXT_DATASETS)
    raw, classes = _raw_splits(name, data_dir)
    _check_labels(name, raw, classes)
    if "val" not in raw:
        texts, labels = raw["train"]
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = min(5000, len(texts) // 10)
        pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        raw["train"], raw["val"] = pick(order[n_val:]), pick(order[:n_val])
    vocab = vocab or Vocab.build(raw["train"][0], min_freq=min_freq, max_size=max_vocab)
    sets = {k: TextSet(vocab.encode_all(t, max_len), torch.tensor(l, dtype=torch.long), vocab.pad_id)
            for k, (t, l) in raw.items()}
    return TextSplits(sets["train"], sets["val"], sets["test"], TextInfo(name, len(classes), classes, max_len), vocab)


def hf_encode(tokenizer, texts, labels, max_len: int = 128) -> TextSet:
    """Encode with a Hugging Face tokenizer (the `text` extra) into a TextSet with its pad id; a model
    is then called as `model(input_ids=ids, attention_mask=ids != pad_id).logits`."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return TextSet(enc["input_ids"].long(), torch.as_tensor(labels, dtype=torch.long), int(tokenizer.pad_token_id))
