"""The benchmarks of `mplsorch lab bench`: `program` (kernel programming, provider against
iproute2) and `setup` (session setup, the balancer daemon against IPVS). Kept free of imports:
the in-namespace helpers (`flood`, `connect`, `sink`) start as `python -m` under this package,
many times a run, in emulated kernels."""
