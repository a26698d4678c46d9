"""textkit: small text helpers (the codebase context of the parallel_agents demo's task).

The demo asks for a new function in this module, ``is_palindrome``; the rest is context the
model reads in the shared trunk.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_WORD = re.compile(r"[A-Za-z0-9']+")
_SPACES = re.compile(r"\s+")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace into single spaces and strip both ends.

    >>> normalize_whitespace("  a \\t b\\n c ")
    'a b c'
    """
    return _SPACES.sub(" ", text).strip()


def strip_accents(text: str) -> str:
    """Remove combining accents: 'café' becomes 'cafe'.

    >>> strip_accents("crème brûlée")
    'creme brulee'
    """
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def slugify(text: str, separator: str = "-") -> str:
    """A lowercase ASCII slug of ``text`` for URLs and file names.

    >>> slugify("Hello, World! 2024")
    'hello-world-2024'
    """
    words = _WORD.findall(strip_accents(text).lower().replace("'", ""))
    return separator.join(words)


def truncate(text: str, width: int, placeholder: str = "...") -> str:
    """Cut ``text`` to at most ``width`` characters, ending with ``placeholder`` if cut.

    Raises:
        ValueError: ``width`` is smaller than the placeholder.

    >>> truncate("The quick brown fox", 12)
    'The quick...'
    """
    if width < len(placeholder):
        raise ValueError("width must be at least the placeholder's length")
    if len(text) <= width:
        return text
    return text[: width - len(placeholder)].rstrip() + placeholder


def word_count(text: str) -> int:
    """The number of words (letters, digits and apostrophes) in ``text``.

    >>> word_count("It's a test, isn't it?")
    5
    """
    return len(_WORD.findall(text))


def most_common_words(text: str, n: int = 3) -> list[tuple[str, int]]:
    """The ``n`` most frequent lowercase words with their counts, most frequent first.

    >>> most_common_words("a b a c b a", 2)
    [('a', 3), ('b', 2)]
    """
    counts = Counter(word.lower() for word in _WORD.findall(text))
    return counts.most_common(n)


def is_anagram(first: str, second: str) -> bool:
    """Whether two strings use the same letters, ignoring case, spaces and punctuation.

    >>> is_anagram("Dormitory", "Dirty room!")
    True
    """

    def letters(text: str) -> Counter[str]:
        return Counter(ch.lower() for ch in text if ch.isalnum())

    return letters(first) == letters(second)


def initials(name: str) -> str:
    """Uppercase initials of a name.

    >>> initials("ada king lovelace")
    'AKL'
    """
    return "".join(part[0].upper() for part in name.split() if part)
