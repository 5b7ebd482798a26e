"""A named table of functions, filled by a decorator: how algorithms, losses and verifiers are looked up by the
name a config or a data record gives. Torch-free, so light processes (reward workers) can import it."""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    """Functions by name; an unknown name is a ValueError listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._table[name].__qualname__})")
            self._table[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._table:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._table[name]

    def names(self) -> list[str]:
        return sorted(self._table)
