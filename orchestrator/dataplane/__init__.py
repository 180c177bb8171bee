"""Dataplane: operations on kernel forwarding objects and the providers that apply them."""
