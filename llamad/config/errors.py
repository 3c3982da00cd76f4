"""The one exception of the config: every problem names its key, so the daemon exits with one line."""

from __future__ import annotations


class ConfigError(Exception):
    """A bad config value; ``str()`` is the one line shown to the user."""

    def __init__(self, key: str, problem: str, source: str = "") -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f" (from {source})" if source and source != "default" else ""
        super().__init__(f"{key}: {problem}{where}")
