"""Fixtures shared by unit test modules.

``no_tracebacks`` is opt-in: a module that wants it says
``pytestmark = pytest.mark.usefixtures("no_tracebacks")``.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture
def no_tracebacks() -> Iterator[None]:
    """A test fails if anything logs a failure (a traceback) while it runs."""
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield
    globalLogPublisher.removeObserver(observe)
    assert failures == []
