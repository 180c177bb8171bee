"""Pure decision core: session labels, schedulers and decisions, with no I/O and no clocks."""
