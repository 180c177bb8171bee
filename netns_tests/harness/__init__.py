"""The harnesses only the netns tests use (orchestrator/lab/ keeps what the demo and the benchmarks
share with them: kit.py, balancer_lab.py, server_lab.py, client_lab.py, traffic.py): `ansible_lab.py` (the
roll-out over SSH) and `reference.py` (the reference session's kernel objects). Counted traffic
is orchestrator/lab/traffic.py (`lab bench restart` runs it too)."""
