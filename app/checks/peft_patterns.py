"""PEFT's `rank_pattern` / `alpha_pattern` rule, written once for the upload check, the worker's reader
and the merge engine's output ranks. Pure Python: app/ and workers/ both import it.

The rule, as PEFT implements it (`peft.utils.other.get_pattern_key`, used by
`LoraModel._create_and_replace`, peft 0.21): for a module named `name` (e.g.
`model.layers.0.self_attn.q_proj`, its path in the base model), the value is that of the *first* key, in
the pattern's order, for which `re.match(rf"(.*\\.)?({key})$", name)` succeeds; a key is therefore a plain
leaf name (`q_proj`), a dotted suffix (`self_attn.q_proj`), the full name, or a regular expression
matching a dotted suffix (`layers\\.[0-3]\\.self_attn\\.q_proj`). When no key matches, the value of the
key equal to `name`, if any, else the default (`r` / `lora_alpha`).

PEFT compiles a key only when a module reaches it; here every key is compiled up front, so an invalid
regular expression is refused, naming the key, before anything is read or stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


class PatternError(ValueError):
    """A pattern key is not a valid regular expression; the message names the pattern and the key."""


@dataclass(frozen=True)
class PeftPattern(Generic[V]):
    """A `rank_pattern` or `alpha_pattern`, compiled: `key_for(name)` and `value(name, default)`."""

    entries: tuple[tuple[str, re.Pattern[str], V], ...]
    values: Mapping[str, V]

    @classmethod
    def compile(cls, pattern: Mapping[str, V] | None, what: str = "pattern") -> PeftPattern[V]:
        """Compile every key of `pattern` (None or {} match nothing); raises PatternError naming the bad key."""
        entries: list[tuple[str, re.Pattern[str], V]] = []
        for key, value in (pattern or {}).items():
            try:
                entries.append((key, re.compile(rf"(.*\.)?({key})$"), value))
            except re.error as error:
                raise PatternError(f"{what} key {key!r} is not a valid regular expression: {error.msg}") from None
        return cls(entries=tuple(entries), values=dict(pattern or {}))

    def key_for(self, name: str) -> str | None:
        """The key whose value applies to module `name`, or None when the default applies."""
        for key, compiled, _ in self.entries:
            if compiled.match(name):
                return key
        return name if name in self.values else None

    def value(self, name: str, default: V) -> V:
        """The pattern's value for module `name`, else `default`."""
        key = self.key_for(name)
        return default if key is None else self.values[key]
