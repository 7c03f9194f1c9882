"""`errors.first_line`: an exception's first line, or its type's name when it has no text (a
database driver's error may have none; its text may run to several lines)."""

from __future__ import annotations

import pytest

from inferplane.errors import first_line


class OperationalError(Exception):
    pass


@pytest.mark.parametrize(("exc", "typed", "expected"), [
    (OperationalError(), False, "OperationalError"),
    (OperationalError("  \n "), False, "OperationalError"),
    (OperationalError("a\nb"), False, "a"),
    (OperationalError(), True, "OperationalError"),
    (OperationalError("a\nb"), True, "OperationalError: a"),
])
def test_first_line(exc: Exception, typed: bool, expected: str) -> None:
    assert first_line(exc, typed=typed) == expected
