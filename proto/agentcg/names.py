"""Names that travel on the wire and may become cgroup path components.

Tenant, session, node and command-class names end up as directory names under the node's cgroup
root, so they are validated once, here, by every side: broker on admission, node before mkdir.
"""

from __future__ import annotations

import re

__all__ = ["InvalidNameError", "validate_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class InvalidNameError(ValueError):
    """A name that is not safe as an identifier and cgroup path component."""

    def __init__(self, field: str, value: str, why: str) -> None:
        super().__init__(f"{field}: invalid name {value!r}: {why}")
        self.field = field
        self.value = value


def validate_name(field: str, value: str, *, allow_empty: bool = False) -> str:
    """Return ``value`` if it is a safe name, else raise InvalidNameError naming ``field``.

    Safe: 1-63 characters of ``[A-Za-z0-9_.-]`` starting with a letter or digit, and no ``..``
    (so it can never be ``.``, ``..``, contain ``/`` or a NUL, or look like a control file).
    """
    if value == "":
        if allow_empty:
            return value
        raise InvalidNameError(field, value, "must not be empty")
    if "/" in value or "\x00" in value:
        raise InvalidNameError(field, value, "must not contain '/' or NUL")
    if ".." in value:
        raise InvalidNameError(field, value, "must not contain '..'")
    if not _NAME_RE.match(value):
        raise InvalidNameError(
            field, value, "use 1-63 of [A-Za-z0-9_.-], starting with a letter or digit"
        )
    return value
