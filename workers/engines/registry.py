"""The one way to reach a method: name -> (function, params model, kind).

Each method module registers itself with `@register(kind, name, params_model)`; `get(kind, name)` is the
only lookup. Nothing outside this module branches on a method's name. `load_all()` imports every method
package so the registry is complete before it is listed or compared with the API schemas.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

MethodKind = Literal["merge", "compress", "unlearn"]


@dataclass(frozen=True)
class Method:
    kind: MethodKind
    name: str
    function: Callable[..., Any]
    params_model: type[BaseModel]


_METHODS: dict[tuple[str, str], Method] = {}
_PACKAGES = ("workers.engines.merge", "workers.engines.unlearn", "workers.engines.compress")


class UnknownMethod(KeyError):
    """No method of that kind and name is registered."""


def register(kind: MethodKind, name: str, params_model: type[BaseModel]) -> Callable[[Callable[..., Any]], Any]:
    def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
        key = (kind, name)
        if key in _METHODS and _METHODS[key].function is not function:
            raise RuntimeError(f"{kind} method {name!r} registered twice")
        _METHODS[key] = Method(kind=kind, name=name, function=function, params_model=params_model)
        return function

    return decorator


def load_all() -> None:
    for package in _PACKAGES:
        importlib.import_module(package)


def get(kind: MethodKind, name: str) -> Method:
    load_all()
    try:
        return _METHODS[(kind, name)]
    except KeyError:
        raise UnknownMethod(f"unknown {kind} method {name!r}") from None


def names(kind: MethodKind) -> list[str]:
    load_all()
    return sorted(name for (k, name) in _METHODS if k == kind)
