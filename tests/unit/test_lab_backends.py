"""The lab's backends (host, uml, vm), the UML kernel cache, built-in modules and the parallel
pytest runner's bookkeeping: everything about them that needs no kernel."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from orchestrator import kmod
from orchestrator.lab import backend, guest, parallel, uml

# ---- choosing a backend ----


def _fake(monkeypatch: pytest.MonkeyPatch, **available: bool) -> None:
    for name, fn in (("host", "host"), ("uml", "uml_kernel"), ("vm", "qemu_vm")):
        ok = available.get(name, False)
        monkeypatch.setattr(backend, fn, lambda n=name, ok=ok: backend.Availability(n, ok, f"{n} says {ok}"))


@pytest.mark.parametrize(
    "available, chosen",
    [({"host": True, "uml": True, "vm": True}, "host"), ({"uml": True, "vm": True}, "uml"), ({"vm": True}, "vm")],
)
def test_auto_takes_the_first_available_of_host_uml_vm(
    monkeypatch: pytest.MonkeyPatch, available: dict[str, bool], chosen: str
) -> None:
    _fake(monkeypatch, **available)
    assert backend.choose(None).name == chosen


def test_no_backend_names_what_each_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch)
    with pytest.raises(backend.BackendError) as e:
        backend.choose(None)
    assert str(e.value) == (
        "no lab backend can run here; host: host says False; uml: uml says False; vm: vm says False"
    )


def test_an_asked_for_backend_that_cannot_run_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, host=True, vm=True)
    with pytest.raises(backend.BackendError, match="backend uml cannot run: uml says False"):
        backend.choose("uml")
    assert backend.choose("vm").name == "vm"


def test_the_environment_names_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BACKEND_ENV, "uml")
    assert backend.requested() == "uml"
    monkeypatch.setenv(backend.BACKEND_ENV, "kvm")
    with pytest.raises(backend.BackendError, match="MPLSORCH_LAB_BACKEND='kvm' is not one of host, uml, vm"):
        backend.requested()
    monkeypatch.delenv(backend.BACKEND_ENV)
    assert backend.requested() is None


def test_status_says_which_would_run_and_why_the_others_cannot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake(monkeypatch, uml=True, vm=True)
    monkeypatch.setenv(uml.CACHE_ENV, str(tmp_path))
    st = backend.status(None)
    assert st["backend"] == "uml"
    assert st["reason"] == "first available: uml says True; not host: host says False"
    assert st["backends"]["host"] == {"available": False, "detail": "host says False"}
    assert st["uml_fragment_sha256"] == uml.fragment_hash()
    assert backend.status("host")["backend"] is None


# ---- the UML kernel and its cache ----


def test_the_fragment_turns_on_what_the_lab_and_product_need() -> None:
    opts = uml.fragment_options()
    for name in (
        "MPLS_ROUTING",
        "MPLS_IPTUNNEL",
        "NET_ACT_MPLS",
        "NET_CLS_FLOWER",
        "NFT_QUEUE",
        "NF_CT_NETLINK",
        "IP_VS",
        "HOSTFS",
        "OVERLAY_FS",
        "NET_NS",
        "VETH",
    ):
        assert opts[f"CONFIG_{name}"] == "y", name


def test_options_the_kernel_would_not_build_are_named() -> None:
    config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n"
    assert uml.missing_options(config, {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "y", "CONFIG_D": "y"}) == [
        "CONFIG_B",
        "CONFIG_C",
        "CONFIG_D",
    ]


def _built(cache: Path, key: str, release: str = "6.1.192") -> Path:
    d = cache / key
    (d / "modules").mkdir(parents=True)
    (d / "linux").write_text("")
    (d / "build.json").write_text(json.dumps({"release": release}))
    return d


def test_a_kernel_is_current_only_for_todays_source_version_and_fragment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(uml.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(uml, "find_source", lambda: uml.KernelSource(Path("/src.tar.xz"), "6.1.192-3"))
    assert uml.built_kernel() is None
    _built(tmp_path, f"6.1.192-2-{uml.fragment_hash()}")  # an older source
    _built(tmp_path, "6.1.192-3-000000000000")  # another fragment
    assert uml.built_kernel() is None
    d = _built(tmp_path, f"6.1.192-3-{uml.fragment_hash()}")
    kernel = uml.built_kernel()
    assert kernel is not None and kernel.dir == d and kernel.release == "6.1.192"
    assert kernel.modules == d / "modules" / "lib" / "modules" / "6.1.192"


def test_without_the_source_the_newest_kernel_of_todays_fragment_serves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(uml.CACHE_ENV, str(tmp_path))

    def gone() -> uml.KernelSource:
        raise guest.GuestUnavailable("no source")

    monkeypatch.setattr(uml, "find_source", gone)
    _built(tmp_path, f"6.1.191-1-{uml.fragment_hash()}", "6.1.191")
    time.sleep(0.01)
    _built(tmp_path, f"6.1.192-3-{uml.fragment_hash()}", "6.1.192")
    kernel = uml.built_kernel()
    assert kernel is not None and kernel.release == "6.1.192"


def test_the_cache_key_follows_the_fragment() -> None:
    assert uml.fragment_hash("CONFIG_A=y\n") != uml.fragment_hash("CONFIG_A=y\nCONFIG_B=y\n")
    assert uml.fragment_options("# c\nCONFIG_A=y\n\nCONFIG_B=m\n") == {"CONFIG_A": "y", "CONFIG_B": "m"}


def test_a_current_kernel_is_not_built_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(uml.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(uml, "find_source", lambda: uml.KernelSource(Path("/src.tar.xz"), "6.1.192-3"))
    _built(tmp_path, f"6.1.192-3-{uml.fragment_hash()}")
    monkeypatch.setattr(uml.subprocess, "run", lambda *a, **k: pytest.fail("built again"))
    kernel, built = uml.build_kernel(lambda _m: None)
    assert not built and kernel.release == "6.1.192"


# ---- modules built into the kernel ----


def test_a_builtin_module_counts_as_there(tmp_path: Path) -> None:
    mods, sysmod = tmp_path / "lib", tmp_path / "sys"
    mods.mkdir()
    sysmod.mkdir()
    assert kmod.available("mpls_router", sysmod, mods) is None  # nothing to tell from
    (mods / "modules.builtin").write_text("kernel/net/mpls/mpls_router.ko\nkernel/net/sched/act-mpls.ko\n")
    (mods / "modules.dep").write_text("kernel/net/sched/cls_flower.ko.xz:\n")
    assert kmod.builtin("mpls_router", mods) and kmod.builtin("act_mpls", mods)
    assert not kmod.builtin("cls_flower", mods)
    assert kmod.available("cls_flower", sysmod, mods) is True  # loadable
    assert kmod.available("nf_tables", sysmod, mods) is False
    (sysmod / "nf_tables").mkdir()
    assert kmod.available("nf_tables", sysmod, mods) is True  # loaded


# ---- what goes into and comes back from a guest ----


def test_the_launcher_runs_the_inner_lab_run_with_exactly_its_environment() -> None:
    script = guest.launcher(
        "/work/my tree", {"MPLSORCH_LAB_IN_VM": "1", "HOME": "/run/guest/home"}, ["--json", "--", "true"]
    )
    assert "cd '/work/my tree' || exit 3\n" in script
    assert "exec env HOME=/run/guest/home MPLSORCH_LAB_IN_VM=1 " in script
    assert script.rstrip().endswith("-m orchestrator lab run --json -- true")


def test_the_guest_env_marks_the_guest_and_carries_mplsorch_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLSORCH_LAB_VERBOSE", "1")
    monkeypatch.setenv("SECRET_TOKEN", "x")
    env = guest.guest_env({"HOME": "/h"})
    assert env[guest.IN_GUEST_ENV] == "1" and env["MPLSORCH_LAB_VERBOSE"] == "1" and env["HOME"] == "/h"
    assert "SECRET_TOKEN" not in env


def test_a_file_relay_copies_what_the_guest_appends(tmp_path: Path) -> None:
    src, out = tmp_path / "stdout", io.StringIO()
    src.write_bytes(b"")
    relay = guest.FileRelay(src, out, interval=0.01)
    relay.start()
    with open(src, "ab") as f:
        f.write(b"one\n")
        f.flush()
        time.sleep(0.05)
        f.write(b"two\n")
    relay.finish()
    assert out.getvalue() == "one\ntwo\n"


# ---- the parallel runner's bookkeeping ----

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
 skipped="1" tests="5"><testcase classname="netns_tests.test_a" name="t1"/><testcase classname="netns_tests.test_a"
 name="t2"><failure message="boom"/></testcase><testcase classname="netns_tests.test_a" name="t3"><skipped
 message="no ipvs"/></testcase><testcase classname="netns_tests.test_a" name="t4"><error message="e"/></testcase>
 <testcase classname="netns_tests.test_a" name="t5"/></testsuite></testsuites>"""


def test_junit_counts_become_the_modules_result(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text(JUNIT)
    r = parallel.parse_junit("netns_tests/test_a.py", tmp_path / "a.xml", 1, 12.5)
    assert (r.tests, r.passed, r.failures, r.errors, r.skipped) == (5, 2, 1, 1, ["netns_tests.test_a::t3: no ipvs"])
    assert not r.ok and r.problem is None


def test_a_lab_that_never_reported_or_ran_nothing_is_an_error(tmp_path: Path) -> None:
    gone = parallel.parse_junit("m.py", tmp_path / "missing.xml", 3, 1.0)
    assert not gone.ok and gone.problem == "the lab ended with exit status 3 before pytest reported"
    (tmp_path / "e.xml").write_text('<testsuites><testsuite tests="0" failures="0" errors="0"/></testsuites>')
    assert parallel.parse_junit("m.py", tmp_path / "e.xml", 5, 1.0).problem == "no test ran"
    (tmp_path / "p.xml").write_text('<testsuites><testsuite tests="2" failures="0" errors="0"/></testsuites>')
    assert parallel.parse_junit("m.py", tmp_path / "p.xml", 0, 1.0).ok
    assert (
        parallel.parse_junit("m.py", tmp_path / "p.xml", 143, 1.0).problem
        == "pytest reported no failure but exited 143"
    )


def test_the_combined_summary_is_a_pytest_closing_line() -> None:
    ok = parallel.ModuleResult("a", 0, 1.0, tests=3)
    bad = parallel.ModuleResult("b", 1, 1.0, tests=2, failures=1, skipped=["b::x: why"])
    lost = parallel.ModuleResult("c", 3, 1.0, problem="the lab ended")
    assert parallel.summary_line([ok], 61.234) == f"{'=' * 20} 3 passed in 61.23s {'=' * 20}"
    assert (
        parallel.summary_line([ok, bad, lost], 5)
        == f"{'=' * 20} 3 passed, 1 failed, 1 skipped, 1 error in 5.00s {'=' * 20}"
    )


def test_a_path_that_is_not_there_is_refused_before_any_lab(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pytest option given before `--` is not a module: no lab runs pytest on the whole tree."""
    (tmp_path / "test_a.py").write_text("")
    monkeypatch.setattr(parallel.backend, "choose", lambda name: pytest.fail("a lab was chosen"))
    assert parallel.run_parallel([str(tmp_path / "test_a.py"), "-q"], None, None, []) == 2
    assert "no such test module or directory: -q (pytest's own arguments go after --)" in capsys.readouterr().err


def test_slow_modules_start_first_and_untimed_ones_before_them(tmp_path: Path) -> None:
    for name, size in (("test_a.py", 10), ("test_b.py", 500), ("test_c.py", 20), ("test_d.py", 30)):
        (tmp_path / name).write_text("#" * size)
    mods = parallel.collect([str(tmp_path)])
    assert [Path(m).name for m in mods] == ["test_a.py", "test_b.py", "test_c.py", "test_d.py"]
    durations = {mods[0]: 100.0, mods[2]: 300.0}
    assert [Path(m).name for m in parallel.order(mods, durations)] == [
        "test_b.py",
        "test_d.py",
        "test_c.py",
        "test_a.py",
    ]
    assert parallel.default_jobs("host") == 1 and parallel.default_jobs("vm") == 1


def test_durations_measured_here_win_over_those_kept_beside_the_modules(tmp_path: Path) -> None:
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / parallel.DURATIONS_FILE).write_text(json.dumps({"test_a.py": 400, "test_b.py": 50}))
    cache = tmp_path / "cache.json"
    cache.write_text(json.dumps({str(tests / "test_b.py"): 60.0}))
    mods = [str(tests / "test_a.py"), str(tests / "test_b.py"), str(tests / "test_c.py")]
    assert parallel.known_durations(mods, cache) == {str(tests / "test_a.py"): 400.0, str(tests / "test_b.py"): 60.0}
    assert parallel.known_durations(mods, tmp_path / "missing.json")[str(tests / "test_b.py")] == 50.0


def test_a_large_uml_guest_gets_room_for_one_host_mapping_per_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """UML maps guest pages one by one: the host's vm.max_map_count must cover the guest's
    memory, or a large guest process is killed (the scale bench's daemon at 150,000 sessions)."""
    from orchestrator.lab import uml

    assert uml.memory_bytes("8G") == 8 << 30 and uml.memory_bytes("512M") == 512 << 20
    knob = tmp_path / "max_map_count"
    knob.write_text("65530\n")
    monkeypatch.setattr(uml, "MAX_MAP_COUNT", knob)
    uml.room_for_mappings("8G")
    assert int(knob.read_text()) == (8 << 30) // 4096 + 65536
    assert "vm.max_map_count 65530 -> 2162688" in capsys.readouterr().err
    knob.write_text("9999999")
    uml.room_for_mappings("8G")  # never lowered
    assert knob.read_text() == "9999999" and capsys.readouterr().err == ""
