"""The data errors: a problem with the input that stops the run with one `data error:` line and exit code 2."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem that stops the run: a glob that matches nothing, too many bad records, an unknown format, a
    damaged indexed dataset."""


class SourceExhausted(DataError):
    """A mixture source capped by `epochs` has no record left (docs/data.md#mixtures)."""
