"""The tests a candidate ``is_palindrome`` must pass.

The parallel_agents demo copies this file next to each candidate (``solution.py``) as
``test_solution.py`` and runs pytest on it in a temporary directory. Every test checks a
palindrome and a non-palindrome, so a function that always answers the same scores nothing.
"""

from solution import is_palindrome


def test_plain_words() -> None:
    assert is_palindrome("racecar") is True
    assert is_palindrome("python") is False


def test_even_length() -> None:
    assert is_palindrome("abba") is True
    assert is_palindrome("abab") is False


def test_short_strings() -> None:
    assert is_palindrome("") is True
    assert is_palindrome("x") is True
    assert is_palindrome("xy") is False


def test_ignores_case() -> None:
    assert is_palindrome("RaceCar") is True
    assert is_palindrome("RaceCars") is False


def test_ignores_spaces_and_punctuation() -> None:
    assert is_palindrome("A man, a plan, a canal: Panama!") is True
    assert is_palindrome("A man, a plan, a canal: Panamax") is False


def test_digits_count() -> None:
    assert is_palindrome("12 321") is True
    assert is_palindrome("12 3 12") is False
