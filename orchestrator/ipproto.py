"""IP protocol numbers (IANA; the kernel's linux/in.h, in6.h), each defined once: the analyser reads
them from packets, the balancer maps a service's protocol to them, the netlink codec writes them
into flower keys and reads them back."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

# The protocols a service and a flower filter name (config `protocol:`, FlowerMatch.ip_proto).
BY_NAME: Mapping[str, int] = MappingProxyType(
    {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "sctp": IPPROTO_SCTP, "esp": IPPROTO_ESP}
)
NAME_OF: Mapping[int, str] = MappingProxyType({number: name for name, number in BY_NAME.items()})
