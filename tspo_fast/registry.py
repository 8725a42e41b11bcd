"""Named extension points: advantage estimators, retrievers, rollout engines.

A :class:`Registry` maps a config name (``advantage.mode: tspo``) to an object.  Entries are the
object itself or, for parts whose dependencies are heavy or optional (vLLM), a
``"package.module:attribute"`` string imported on first use.  Config validation lists the
registered names, so a registered extension is a valid config value at once::

    from tspo_fast.algo.advantages import ESTIMATORS
    ESTIMATORS.register("my_rule", my_rule)          # then: --set advantage.mode=my_rule
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Generic, Iterator, TypeVar, Union

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """``name -> entry`` for one config field (named in errors: ``field``)."""

    def __init__(self, field: str, entries: Dict[str, Union[T, str]] | None = None):
        self.field = field
        self._entries: Dict[str, Union[T, str]] = dict(entries or {})

    def register(self, name: str, entry: Union[T, str] | None = None, *, replace: bool = False):
        """Add ``entry`` under ``name``; used bare (``register("x", fn)``) or as a decorator."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.field}: a registry name must be a non-empty string, got {name!r}")

        def add(obj):
            if name in self._entries and not replace:
                raise ValueError(f"{self.field}: {name!r} is already registered (pass replace=True)")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, name: str) -> T:
        """The entry of ``name`` (a ``"module:attr"`` entry is imported now and kept)."""
        if name not in self._entries:
            raise KeyError(f"{self.field}: unknown value {name!r}; registered: {', '.join(map(repr, self._entries))}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._entries[name] = entry = obj
        return entry  # type: ignore[return-value]
