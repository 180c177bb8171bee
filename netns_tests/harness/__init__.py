"""The harnesses only the netns tests use (moved here from orchestrator/lab/, which keeps what the
demo and the benchmarks share with them: kit.py, balancer_lab.py): `server_lab.py` (the agent on
every server behind the real balancer), `ansible_lab.py` (the roll-out over SSH), `reference.py`
(the reference session's kernel objects) and `traffic.py` (counted traffic and the ruleset's
counters)."""
