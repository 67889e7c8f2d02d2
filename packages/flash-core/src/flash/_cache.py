"""A bounded least-recently-used cache that forgets everything when the registry changes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from flash.registry import REGISTRY

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A least-recently-used mapping of at most ``maxsize`` entries, forgotten whenever the registry changes."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()
        self._generation = -1
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        if self._generation != REGISTRY.generation:
            self.clear()
        found = self._data.get(key)
        if found is not None:
            try:  # noqa: SIM105 (contextlib.suppress would cost a context manager on every hit)
                self._data.move_to_end(key)
            except KeyError:  # another thread evicted it meanwhile
                pass
        return found

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._generation = REGISTRY.generation

    def __len__(self) -> int:
        return len(self._data)
