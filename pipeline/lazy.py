"""Lazy package exports (PEP 562): what a package's ``__getattr__`` imported is kept in its namespace."""
from __future__ import annotations


def keep(namespace: dict, imported: dict, name: str):
    """Store the public names among ``imported`` (a ``__getattr__``'s ``locals()`` after its imports) in the package
    ``namespace`` (its ``globals()``), so later lookups skip ``__getattr__``; return the one asked for."""
    found = {k: v for k, v in imported.items() if k in namespace["__all__"]}
    namespace.update(found)
    return found[name]


def listing(namespace: dict) -> list[str]:
    """``dir()`` of a lazy package: what it holds and what it exports."""
    return sorted(set(namespace) | set(namespace["__all__"]))
