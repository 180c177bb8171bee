"""The harnesses only the netns tests use (orchestrator/lab/ keeps what the demo and the benchmarks
share with them: kit.py, balancer_lab.py, server_lab.py, client_lab.py): `ansible_lab.py` (the
roll-out over SSH), `reference.py` (the reference session's kernel objects) and `traffic.py`
(counted traffic and the ruleset's counters); `server_lab.py`
here re-exports orchestrator/lab/server_lab.py."""
