"""Caption-to-vocabulary matching shared by `text_based` and `metaclip_balance`.

Terms are matched on word boundaries, case-insensitively: every run of up to N consecutive
caption words (N = the longest term, in words) is looked up in a set. The cost per caption is
independent of the vocabulary's size, which matters for MetaCLIP-sized lists (500k entries),
where one regex alternation or a loop over terms would not scale.
"""

from __future__ import annotations

import re
from pathlib import Path

_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def load_terms(words: list[str] | None, path: str | None) -> list[str]:
    """The vocabulary: inline words plus a word-list file (one term per line, # comments), normalised."""
    terms = list(words or [])
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        terms += [line.split("#", 1)[0] for line in file.read_text(encoding="utf-8").splitlines()]
    normalised = {" ".join(words_of(term)) for term in terms}
    return sorted(t for t in normalised if t)


class TermMatcher:
    """Which vocabulary terms each caption contains (with a plural 's'/'es' accepted)."""

    def __init__(self, terms: list[str]):
        self.terms = terms
        self.index = {term: i for i, term in enumerate(terms)}
        self.max_words = max((len(t.split()) for t in terms), default=0)

    def _lookup(self, phrase: str) -> int | None:
        for suffix in ("", "s", "es"):  # the term itself, or its plural
            if phrase.endswith(suffix) and phrase[: len(phrase) - len(suffix)] in self.index:
                return self.index[phrase[: len(phrase) - len(suffix)]]
        return None

    def matches(self, caption: str) -> list[int]:
        """Indices of the terms found in the caption, each once, in vocabulary order."""
        words = words_of(caption)
        found: set[int] = set()
        for start in range(len(words)):
            for length in range(1, min(self.max_words, len(words) - start) + 1):
                hit = self._lookup(" ".join(words[start : start + length]))
                if hit is not None:
                    found.add(hit)
        return sorted(found)
