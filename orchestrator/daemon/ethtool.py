"""A device's ethtool features (`ethtool -k` / `ethtool -K`) through the SIOCETHTOOL ioctl, so
the node check needs no ethtool binary: the names come from the kernel's own string set
(ETH_SS_FEATURES), the bits from ETHTOOL_GFEATURES, and a change goes through ETHTOOL_SFEATURES.
Works in the network namespace of the calling thread."""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct
from dataclasses import dataclass

SIOCETHTOOL = 0x8946
ETHTOOL_GSTRINGS, ETHTOOL_GSSET_INFO, ETHTOOL_GFEATURES, ETHTOOL_SFEATURES = 0x1B, 0x37, 0x3A, 0x3B
ETH_SS_FEATURES = 4
ETH_GSTRING_LEN = 32
IFNAMSIZ = 16


@dataclass(frozen=True)
class Feature:
    """One feature of a device: `available` (the driver lets it be switched: ethtool shows
    `[fixed]` when not) and `active` (on now)."""

    available: bool
    active: bool


def _ioctl(dev: str, data: ctypes.Array[ctypes.c_char]) -> None:
    if len(dev.encode()) >= IFNAMSIZ:
        raise OSError(f"interface name {dev!r} is too long")
    ifreq = struct.pack(f"{IFNAMSIZ}sP", dev.encode(), ctypes.addressof(data)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


def _names(dev: str) -> list[str]:
    info = ctypes.create_string_buffer(struct.pack("=IIQI", ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_FEATURES, 0))
    _ioctl(dev, info)
    count = struct.unpack_from("=I", info.raw, 16)[0]
    strings = ctypes.create_string_buffer(
        struct.pack("=III", ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count) + bytes(count * ETH_GSTRING_LEN)
    )
    _ioctl(dev, strings)
    raw = strings.raw[12 : 12 + count * ETH_GSTRING_LEN]
    return [raw[i : i + ETH_GSTRING_LEN].split(b"\0", 1)[0].decode() for i in range(0, len(raw), ETH_GSTRING_LEN)]


def feature(dev: str, name: str) -> Feature | None:
    """The feature `name` (as `ethtool -k` spells it, e.g. `hw-tc-offload`) of `dev`, None when
    the kernel knows no such feature. OSError when the device does not exist."""
    names = _names(dev)
    if name not in names:
        return None
    bit = names.index(name)
    blocks = (len(names) + 31) // 32
    buf = ctypes.create_string_buffer(struct.pack("=II", ETHTOOL_GFEATURES, blocks) + bytes(16 * blocks))
    _ioctl(dev, buf)
    available, _requested, active, never_changed = struct.unpack_from("=IIII", buf.raw, 8 + 16 * (bit // 32))
    mask = 1 << (bit % 32)
    return Feature(bool(available & mask and not never_changed & mask), bool(active & mask))


def set_feature(dev: str, name: str, on: bool) -> None:
    """`ethtool -K DEV NAME on|off`; OSError when the kernel refuses or knows no such feature."""
    names = _names(dev)
    if name not in names:
        raise OSError(f"the kernel has no feature {name!r}")
    bit = names.index(name)
    blocks = (len(names) + 31) // 32
    body = bytearray(struct.pack("=II", ETHTOOL_SFEATURES, blocks) + bytes(8 * blocks))
    mask = 1 << (bit % 32)
    struct.pack_into("=II", body, 8 + 8 * (bit // 32), mask, mask if on else 0)
    _ioctl(dev, ctypes.create_string_buffer(bytes(body)))
    now = feature(dev, name)
    if now is None or now.active != on:
        raise OSError(f"{dev}: {name} is still {'off' if on else 'on'} (the driver did not take the change)")
