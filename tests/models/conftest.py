from __future__ import annotations

from typing import Any, Callable

import pytest

from ftlab.errors import FtlabError


@pytest.fixture
def refused_both_ways() -> Callable[..., None]:
    """Check that settings ``cls(**change)`` are refused when built, and that the same values set
    on valid settings afterwards are refused by ``use(settings)`` (the code that applies them)."""
    def check(cls: type, change: dict[str, Any], match: str, use: Callable[[Any], Any]) -> None:
        with pytest.raises(FtlabError, match=match):
            cls(**change)
        settings = cls()
        for key, value in change.items():
            setattr(settings, key, value)
        with pytest.raises(FtlabError, match=match):
            use(settings)
    return check
