"""The CLI's tables (`mplsorch sessions|servers|labels|routes` without --json) are plain text:
aligned columns (issue 15: `sessions` under 1 s at 500,000 sessions; rich's tables took 0.76 s
of the host's CPU for one page of 1,000, the plain one 2-3 ms: `lab bench scale` measures it)."""

from __future__ import annotations

import pytest

from orchestrator.cli.client import print_table


def test_a_table_has_its_title_header_and_aligned_rows(capsys: pytest.CaptureFixture[str]) -> None:
    print_table("sessions", ["id", "client", "flows"], [[1, "10.0.1.10", 2], [22, "fd00:1::10", None]])
    assert capsys.readouterr().out.splitlines() == [
        "sessions",
        "id  client      flows",
        "--  ----------  -----",
        "1   10.0.1.10   2",
        "22  fd00:1::10",
    ]
