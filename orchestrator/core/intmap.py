"""A map of non-negative ints to non-negative ints kept in two arrays (open addressing, linear
probing): 12 bytes a slot, no Python object per entry, where a dict costs about 110 bytes an entry
with its two int objects (issue 15: memory per session). The session table's indexes."""

from __future__ import annotations

from array import array

_EMPTY = -1
_FIB = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads keys that differ in any bits
_MASK64 = (1 << 64) - 1


class IntMap:
    """Keys and values are ints in 0 .. 2**63 - 1 and 0 .. 2**31 - 1; at most half the slots
    are used, so a lookup probes about 1.5 slots."""

    __slots__ = ("_keys", "_values", "_bits", "_shift", "_mask", "_used")

    def __init__(self, bits: int = 10) -> None:
        self._size(bits)
        self._used = 0

    def _size(self, bits: int) -> None:
        self._bits, self._shift, self._mask = bits, 64 - bits, (1 << bits) - 1
        self._keys = array("q", [_EMPTY]) * (1 << bits)
        self._values = array("i", bytes(4 << bits))

    def __len__(self) -> int:
        return self._used

    def _slot(self, key: int) -> int:
        return ((key * _FIB) & _MASK64) >> self._shift

    def get(self, key: int) -> int:
        """The value of `key`; -1 if it has none."""
        keys = self._keys
        i = ((key * _FIB) & _MASK64) >> self._shift
        k = keys[i]
        while k != key:
            if k == _EMPTY:
                return -1
            i = (i + 1) & self._mask
            k = keys[i]
        return self._values[i]

    def put(self, key: int, value: int) -> None:
        keys, mask = self._keys, self._mask
        i = ((key * _FIB) & _MASK64) >> self._shift
        k = keys[i]
        while k != key:
            if k == _EMPTY:
                keys[i] = key
                self._values[i] = value
                self._used += 1
                if 2 * self._used > mask:
                    self._grow()
                return
            i = (i + 1) & mask
            k = keys[i]
        self._values[i] = value

    def pop(self, key: int) -> int:
        """Removes `key`; its value, -1 if it had none. Backward-shift deletion: the entries
        after it in its run move up, so no tombstone is left."""
        keys, values, mask = self._keys, self._values, self._mask
        i = self._slot(key)
        while True:
            k = keys[i]
            if k == _EMPTY:
                return -1
            if k == key:
                break
            i = (i + 1) & mask
        value = values[i]
        self._used -= 1
        j = i
        while True:
            j = (j + 1) & mask
            k = keys[j]
            if k == _EMPTY:
                break
            home = self._slot(k)
            # the entry at j may move to the hole at i unless its home lies cyclically in (i, j]
            if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
                keys[i], values[i] = k, values[j]
                i = j
        keys[i] = _EMPTY
        return value

    def _grow(self) -> None:
        old_keys, old_values = self._keys, self._values
        self._size(self._bits + 1)
        self._used = 0
        for k, v in zip(old_keys, old_values, strict=True):
            if k != _EMPTY:
                self.put(k, v)
