"""`Node`: a mapping of the manifest's YAML document that reports what it reads wrong.

Every part of the manifest is read through it (tollway.manifest.loader and .orgs, the keys part
of .keys_part, and the runtime clients and keys of tollway.keys.runtime), so each problem is
named by its path and the rule it breaks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, TypeVar

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
REF_RE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$")

T = TypeVar("T")


# every absent or empty `metadata` (most of them): one shared view, not one object each that
# the garbage collector walks for every runtime key's binding
NO_ENTRIES: MappingProxyType[str, Any] = MappingProxyType({})


class Node:
    """A mapping in the YAML document, with its path, that reports what it reads wrong. A
    10,000-project manifest makes 70,000 of them: slots, and no dataclass machinery."""

    __slots__ = ("errors", "path", "value")

    def __init__(self, value: dict[str, Any], path: str, errors: list[str]) -> None:
        self.value = value
        self.path = path
        self.errors = errors

    def at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, rule: str) -> None:
        self.errors.append(f"{self.at(name)}: {rule}")

    def check_keys(self, allowed: AbstractSet[str]) -> None:
        for k in self.value:
            if k not in allowed:
                self.fail(str(k), f"unknown field (expected one of {', '.join(sorted(allowed))})")

    def has(self, name: str) -> bool:
        return self.value.get(name) is not None

    def text(self, name: str, default: str | None = None, *, pattern: re.Pattern[str] | None = None,
            rule: str = "") -> str:
        v = self.value.get(name)
        if v is None:
            if default is None:
                self.fail(name, "is required")
                return ""
            return default
        if not isinstance(v, str) or not v:
            self.fail(name, "must be a non-empty string")
            return ""
        if pattern is not None and not pattern.match(v):
            self.fail(name, rule or f"must match {pattern.pattern}")
        return v

    def opt_str(self, name: str) -> str | None:
        if self.value.get(name) is None:
            return None
        return self.text(name)

    def integer(self, name: str, default: int | None = None, *, minimum: int = 1) -> int:
        v = self.value.get(name)
        if v is None:
            if default is None:
                self.fail(name, "is required")
                return 0
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(name, "must be a positive integer" if minimum == 1
                      else f"must be an integer >= {minimum}")
            return 0
        return v

    def flag(self, name: str, default: bool) -> bool:
        v = self.value.get(name, default)
        if not isinstance(v, bool):
            self.fail(name, "must be true or false")
            return default
        return v

    def decimal(self, name: str, *, required: bool = True) -> Decimal | None:
        v = self.value.get(name)
        if v is None:
            if required:
                self.fail(name, "is required")
            return None
        try:
            # str() first: YAML floats like 0.075 must stay exactly 0.075, not its binary neighbour
            d = Decimal(str(v)) if not isinstance(v, bool) else None
        except InvalidOperation:
            d = None
        if d is None or not d.is_finite() or d < 0:
            self.fail(name, "must be a non-negative number")
            return None
        return d

    def enum(self, name: str, kind: type[T], default: T | None = None) -> T:
        v = self.value.get(name)
        if v is None and default is not None:
            return default
        try:
            return kind(v)  # type: ignore[call-arg]
        except ValueError:
            options = ", ".join(str(m.value) for m in kind)  # type: ignore[attr-defined]
            self.fail(name, f"must be one of {options}" if v is not None else "is required")
            return default if default is not None else next(iter(kind))  # type: ignore[call-overload]

    def str_list(self, name: str) -> tuple[str, ...] | None:
        v = self.value.get(name)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            self.fail(name, "must be a list of non-empty strings")
            return ()
        return tuple(v)

    def mapping(self, name: str) -> MappingProxyType[str, Any]:
        v = self.value.get(name)
        if v is None:
            return NO_ENTRIES
        if not isinstance(v, dict):
            self.fail(name, "must be a mapping")
            return NO_ENTRIES
        return MappingProxyType(dict(v)) if v else NO_ENTRIES

    def child(self, name: str, *, required: bool = False) -> Node:
        v = self.value.get(name)
        if v is None:
            if required:
                self.fail(name, "is required")
            return Node({}, self.at(name), self.errors)
        if not isinstance(v, dict):
            self.fail(name, "must be a mapping")
            return Node({}, self.at(name), self.errors)
        return Node(v, self.at(name), self.errors)

    def items(self, name: str, *, required: bool = False) -> Iterator[Node]:
        v = self.value.get(name)
        if v is None:
            if required:
                self.fail(name, "is required")
            return
        if not isinstance(v, list):
            self.fail(name, "must be a list")
            return
        base, errors = self.at(name), self.errors
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                errors.append(f"{base}[{i}]: must be a mapping")
                continue
            yield Node(item, f"{base}[{i}]", errors)
