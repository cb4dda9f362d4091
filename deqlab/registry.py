"""Name -> object registries for the engine's pluggable parts (solvers, gradient modes, cores).

A name is either one registered in Python (``register_solver("newton", newton)``) or an import
path ``package.module:attribute``, so a config can select a user's own part from the command
line (``solver.name=mypkg.solvers:newton``) without any Python glue. An import path is loaded,
checked like a registration, and remembered under that path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``what``: "solver", "gradient mode", "core").

    ``check(name, obj)`` validates an entry when it is registered or imported.
    ``hint`` tells the user how to add one when a name is unknown.
    """

    def __init__(self, what: str, hint: str, check: Callable[[str, T], None] | None = None):
        self.what, self.hint, self.check = what, hint, check
        self.entries: dict[str, T] = {}
        self.lazy: dict[str, str] = {}  # name -> import path, loaded on first use
        self.imported: dict[str, T] = {}  # import paths already loaded and checked

    def register(self, name: str, obj: T) -> T:
        if self.check is not None:
            self.check(name, obj)
        self.entries[name] = obj
        return obj

    def register_lazy(self, name: str, path: str) -> None:
        """Register the object at import path ``path`` as ``name`` when first asked for."""
        self.lazy[name] = path

    def get(self, name: str) -> T:
        if name in self.entries:
            return self.entries[name]
        if name in self.lazy:
            return self.register(name, load_object(self.lazy.pop(name), self.what))  # type: ignore[arg-type]
        if ":" in name:
            if name not in self.imported:
                obj = load_object(name, self.what)
                if self.check is not None:
                    self.check(name, obj)  # type: ignore[arg-type]
                self.imported[name] = obj  # type: ignore[assignment]
            return self.imported[name]
        raise ValueError(
            f"unknown {self.what} {name!r}; known: {', '.join(sorted({*self.entries, *self.lazy}))} "
            f"({self.hint}, or name one by import path, package.module:attribute)"
        )

    def __contains__(self, name: str) -> bool:
        return name in self.entries or name in self.lazy or name in self.imported


def load_object(path: str, what: str) -> object:
    """The object at ``package.module:attribute`` (dots in the attribute walk into it)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} import path {path!r} must read package.module:attribute")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{what} {path!r}: module {module_name!r} has no {attr!r}") from None
    return obj
