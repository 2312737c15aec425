"""The one registry mechanism: name -> object dicts filled by decorators (models, predictors, ...)."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Optional, Tuple, TypeVar

T = TypeVar('T')


class Registry(Generic[T]):
  """A named dict filled by a decorator; unknown names raise a ValueError listing the known ones."""

  def __init__(self, kind: str, on_miss: Optional[Callable[[], None]] = None):
    self.kind = kind
    self._entries: Dict[str, T] = {}
    self._on_miss = on_miss  # e.g. import the modules that register entries

  def register(self, obj: Optional[T] = None, *, name: Optional[str] = None):
    """Decorator (bare or with name=) that registers `obj` under `name` or its __name__."""

    def _register(obj: T) -> T:
      key = name or obj.__name__
      if key in self._entries and self._entries[key] is not obj:
        raise ValueError(f'A {self.kind} named {key!r} is already registered.')
      self._entries[key] = obj
      return obj

    return _register if obj is None else _register(obj)

  def get(self, name: str) -> T:
    """The entry registered under `name`."""
    if name not in self._entries and self._on_miss is not None:
      self._on_miss()
    if name not in self._entries:
      raise ValueError(f'Unknown {self.kind} {name!r}; valid choices: {self.names()}.')
    return self._entries[name]

  def check(self, name: str) -> str:
    """Returns `name` if registered, else raises the ValueError of `get`."""
    self.get(name)
    return name

  def names(self) -> Tuple[str, ...]:
    """Sorted names of every entry."""
    if self._on_miss is not None:
      self._on_miss()
    return tuple(sorted(self._entries))

  def __contains__(self, name: str) -> bool:
    return name in self.names()
