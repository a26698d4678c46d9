"""Readable test prompts."""

from __future__ import annotations

_MODULE = '''
def parse_config(path):
    """Read a key=value config file into a dict."""
    result = {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ValueError(f"line {number}: expected key=value")
            key, value = line.split("=", 1)
            result[key.strip()] = value.strip()
    return result
'''


def long_trunk(copies: int = 9) -> str:
    """A code-review context of roughly 1,200 tokens with the default model's tokenizer."""
    parts = ["You are reviewing a pull request for a small configuration library.\n"]
    for index in range(copies):
        parts.append(f"\n# File config_{index}.py\n{_MODULE}")
    parts.append("\nThe author says the change makes parsing stricter about malformed lines.\n")
    return "".join(parts)
