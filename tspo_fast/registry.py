"""Named extension points: advantage estimators, retrievers, rollout engines.

A :class:`Registry` belongs to one config field (``advantage.mode``, ``retrieval.kind``,
``rollout.engine``).  The field's value is either

* a registered name (``tspo``, ``inprocess``, ``vllm``): entries are the object itself or, for
  parts whose dependencies are heavy or optional (vLLM), a ``"package.module:attribute"`` string
  imported on first use; or
* a path ``"package.module:attribute"`` to any importable object: a plugin, used from a config
  file alone (no registration, no wrapper script).  :meth:`Registry.check` imports it when the
  config is loaded and checks that it can be called the way the extension point calls it.

Each extension point also has an ``options`` mapping beside its field (``advantage.options``,
...), handed to the extension unchanged.  A registered entry may declare the options it accepts
(the built-ins accept none); :meth:`Registry.check` rejects the others, naming them.  A plugin
path's options are the plugin's to validate.

Registering a name is still possible (a name then lists in the config's error messages)::

    from tspo_fast.algo.advantages import ESTIMATORS
    ESTIMATORS.register("my_rule", my_rule)          # then: --set advantage.mode=my_rule
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Dict, Generic, Iterator, Mapping, Optional, Sequence, TypeVar, Union

T = TypeVar("T")

__all__ = ["ExtensionError", "Registry", "import_path", "is_path"]


class ExtensionError(ValueError):
    """An extension value cannot be used: unknown name, import failure, wrong kind, bad options.
    The message starts with the config field it came from."""


def is_path(value: str) -> bool:
    """Whether a config value is a ``package.module:attribute`` path rather than a registered name."""
    return ":" in value


def import_path(path: str, where: str) -> Any:
    """The object at ``"package.module:attribute"`` (``attribute`` may be dotted: ``Class.method``);
    :class:`ExtensionError` naming ``where`` when the module or the attribute is missing."""
    module, _, attr = path.partition(":")
    if not module or not attr or ":" in attr:
        raise ExtensionError(f"{where}: {path!r} is not a 'package.module:attribute' path")
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as e:
        hint = "; is its folder on PYTHONPATH?" if e.name and (module + ".").startswith(e.name + ".") else ""
        raise ExtensionError(f"{where}: cannot import module {module!r} of {path!r} ({type(e).__name__}: {e})"
                             f"{hint}") from None
    except Exception as e:  # the plugin's own module fails while it is imported: reported with its error
        raise ExtensionError(f"{where}: importing module {module!r} of {path!r} failed "
                             f"({type(e).__name__}: {e})") from e
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = module if i == 0 else f"{module}:{'.'.join(attr.split('.')[:i])}"
            raise ExtensionError(f"{where}: {owner!r} has no attribute {part!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """``name -> entry`` for one config field (named in errors: ``field``).

    role, call: what an entry is and the arguments the extension point passes it, positionally
    (``"estimator"``, ``("batch", "outcome", "first_turn", "settings")``); an entry must accept
    that call (checked at config load for plugin paths and registered objects).
    options_field: where the entries' options live in a config (default: ``field`` with its last
    part replaced by ``options``).
    """

    def __init__(self, field: str, entries: Dict[str, Union[T, str]] | None = None, *,
                 role: str = "entry", call: Sequence[str] = (), options: Optional[Mapping[str, Sequence[str]]] = None,
                 options_field: Optional[str] = None):
        self.field = field
        self.role = role
        self.call = tuple(call)
        self.options_field = options_field or f"{field.rpartition('.')[0] or field}.options"
        self._entries: Dict[str, Union[T, str]] = {}
        self._options: Dict[str, Optional[tuple]] = {}
        for name, entry in (entries or {}).items():
            self.register(name, entry, options=(options or {}).get(name))

    def register(self, name: str, entry: Union[T, str] | None = None, *, options: Optional[Sequence[str]] = None,
                 replace: bool = False):
        """Add ``entry`` under ``name``; used bare (``register("x", fn)``) or as a decorator.

        options: the option names ``entry`` accepts (``()``: none; None: not checked here).
        """
        if not isinstance(name, str) or not name or is_path(name):
            raise ValueError(f"{self.field}: a registry name must be a non-empty string without ':' "
                             f"(':' marks a 'package.module:attribute' path), got {name!r}")

        def add(obj):
            if name in self._entries and not replace:
                raise ValueError(f"{self.field}: {name!r} is already registered (pass replace=True)")
            self._entries[name] = obj
            self._options[name] = None if options is None else tuple(options)
            return obj

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        self._options.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, value: str) -> T:
        """The entry of a registered name (a ``"module:attr"`` entry is imported now and kept), or
        the object at a ``package.module:attribute`` path."""
        if value in self._entries:
            entry = self._entries[value]
            if isinstance(entry, str):
                self._entries[value] = entry = import_path(entry, f"{self.field}: registered {value!r}")
            return _factory(entry)  # type: ignore[return-value]
        if isinstance(value, str) and is_path(value):
            return _factory(import_path(value, self.field))
        raise ExtensionError(f"{self.field}: unknown value {value!r}; registered: "
                             f"{', '.join(map(repr, self._entries))}, or a 'package.module:attribute' path")

    def check(self, value: str, options: Optional[Mapping[str, Any]] = None) -> None:
        """Validate a config value and its options, as at config load: a registered name (not
        imported here), or a path whose object is imported and must accept :attr:`call`; an
        entry's declared options must include every key of ``options``."""
        if options is not None and not isinstance(options, Mapping):
            raise ExtensionError(f"{self.options_field}: expected a mapping, got {type(options).__name__}")
        if isinstance(value, str) and value in self._entries:
            known = self._options[value]
            unknown = sorted(set(options or {}) - set(known)) if known is not None else []
            if unknown:
                takes = f"accepts {', '.join(map(repr, known))}" if known else "takes no options"
                raise ExtensionError(f"{self.options_field}: unknown option(s) {', '.join(map(repr, unknown))} for "
                                     f"{self.field} {value!r}, which {takes}")
            if not isinstance(self._entries[value], str):       # a "module:attr" entry is imported when used
                self._check_callable(_factory(self._entries[value]), value)
            return
        if not (isinstance(value, str) and is_path(value)):
            raise ExtensionError(f"{self.field}: must be one of {', '.join(map(repr, self._entries))} or a "
                                 f"'package.module:attribute' path, got {value!r}")
        self._check_callable(self.get(value), value)

    def _check_callable(self, obj: Any, value: str) -> None:
        wanted = f"{self.role}({', '.join(self.call)})"
        if not callable(obj):
            raise ExtensionError(f"{self.field}: {value!r} is of type {type(obj).__name__}, not callable as {wanted}")
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):      # some builtins have no signature: nothing to check
            return
        try:
            sig.bind(*self.call)
        except TypeError as e:
            raise ExtensionError(f"{self.field}: {value!r} has the signature {sig}, which cannot be called as "
                                 f"{wanted} ({e})") from None


def _factory(obj: Any) -> Any:
    """A class with a ``from_config`` is used through it (``kind: pkg.mod:MyRetriever``)."""
    if inspect.isclass(obj) and callable(getattr(obj, "from_config", None)):
        return obj.from_config
    return obj

