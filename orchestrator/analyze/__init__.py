"""First-packet analysis (raw IP bytes -> Packet) and session key derivation; no I/O, no scapy."""

from .keys import SessionKey, SessionKeyKind, icmp_error_client, icmp_error_session_key, session_key
from .packet import MAX_EXT_HEADERS, REASONS, Malformed, Packet, analyze

__all__ = [
    "analyze",
    "Packet",
    "Malformed",
    "REASONS",
    "MAX_EXT_HEADERS",
    "SessionKey",
    "SessionKeyKind",
    "session_key",
    "icmp_error_client",
    "icmp_error_session_key",
]
