"""The one error type of the data path that a user can cause and fix."""

from __future__ import annotations

from samoe_dist.config import ConfigError


class DataError(ConfigError):
    """Bad input text, a bad or mismatched tokenizer, a missing or corrupt indexed dataset.

    The message is one line: the file (and line, where one applies), what is wrong, and what to
    do. A ``ConfigError`` (so a ``ValueError``), which the entry script prints as one line.
    """
