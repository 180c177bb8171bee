"""The lab's User-Mode Linux backend: build the kernel once, boot it over the host's filesystem.

A UML kernel is an ordinary process that runs user code at native speed, boots in seconds and
uses one CPU, so several labs run side by side (QEMU without working KVM emulates every
instruction, about 25x slower). Debian's own user-mode-linux package lacks nf_tables for
ip/ip6/inet, so the kernel is built from Debian's linux-source package with the options in
`uml_kernel.config`, into a cache directory named after the source version and the fragment's
hash: a change to either builds a new kernel, anything else reuses the one there.

The guest's root is the host's / over hostfs, read-write. Its init mounts tmpfs on /run, /tmp,
/dev/shm, /lib/modules and an overlay (upper layer in tmpfs) on /etc, so what the lab writes
there (network namespaces, /etc/netns, state files, keys, sockets) disappears with the guest,
however it ends. HOME stays the caller's: tools found through it (pyenv's shims) keep working. Output comes back through two files that the guest
appends to and the host relays as they grow; the exit status through a third.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from orchestrator.lab.guest import (
    RESULT_ENV,
    FileRelay,
    GuestResult,
    GuestUnavailable,
    guest_env,
    launcher,
    read_result,
)

FRAGMENT = Path(__file__).with_name("uml_kernel.config")
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_DIR = Path("/usr/src")
CACHE_ENV = "MPLSORCH_LAB_CACHE"
DEFAULT_CACHE = Path("/var/cache/mplsorch/lab")
BUILD_PACKAGES = (SOURCE_PACKAGE, "build-essential", "flex", "bison", "bc", "libelf-dev")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


@dataclass(frozen=True)
class KernelSource:
    """Debian's kernel source tarball and the version of the package that installed it."""

    tarball: Path
    version: str


@dataclass(frozen=True)
class Kernel:
    """A built UML kernel: the binary and the modules tree whose modules.builtin lists what is in."""

    dir: Path

    @property
    def binary(self) -> Path:
        return self.dir / "linux"

    @property
    def info(self) -> dict[str, str]:
        try:
            data = json.loads((self.dir / "build.json").read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    @property
    def release(self) -> str:
        return self.info.get("release", "")

    @property
    def modules(self) -> Path:
        return self.dir / "modules" / "lib" / "modules" / self.release


def fragment_text() -> str:
    return FRAGMENT.read_text()


def fragment_options(text: str | None = None) -> dict[str, str]:
    """CONFIG_NAME -> value, from the fragment's `CONFIG_NAME=value` lines."""
    out: dict[str, str] = {}
    for line in (fragment_text() if text is None else text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name] = value
    return out


def fragment_hash(text: str | None = None) -> str:
    return hashlib.sha256((fragment_text() if text is None else text).encode()).hexdigest()[:12]


def find_source() -> KernelSource:
    """The linux-source tarball and its package version, or GuestUnavailable naming the package."""
    tarball = SOURCE_DIR / f"{SOURCE_PACKAGE}.tar.xz"
    if not tarball.is_file():
        raise GuestUnavailable(f"{tarball} is missing (apt-get install {' '.join(BUILD_PACKAGES)})")
    try:
        version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        st = tarball.stat()  # not from a package: the file itself stands for its version
        version = f"{st.st_size}.{int(st.st_mtime)}"
    return KernelSource(tarball, version)


def _key(version: str, fhash: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9.+~-]', '_', version)}-{fhash}"


def built_kernel() -> Kernel | None:
    """The kernel for today's source and fragment; without the source, the newest one built from
    today's fragment. None when there is none."""
    fhash = fragment_hash()
    try:
        candidates = [cache_dir() / _key(find_source().version, fhash)]
    except GuestUnavailable:
        candidates = sorted(cache_dir().glob(f"*-{fhash}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for d in candidates:
        k = Kernel(d)
        if k.binary.is_file() and k.release:
            return k
    return None


@contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second build waits for the first, then finds it done
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make(src: Path, log: Path, *args: str) -> str:
    with open(log, "a") as out:
        out.write(f"$ make ARCH=um {' '.join(args)}\n")
        out.flush()
        p = subprocess.run(["make", "-C", str(src), "ARCH=um", *args], stdout=subprocess.PIPE, stderr=out, text=True)
        out.write(p.stdout)
    if p.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise GuestUnavailable(f"the UML kernel build failed (`make ARCH=um {' '.join(args)}`, log {log}):\n{tail}")
    return p.stdout


def missing_options(config_text: str, wanted: dict[str, str]) -> list[str]:
    """The fragment's options that a resolved .config does not have as asked (dependencies
    missing, or a name the kernel does not know)."""
    have: dict[str, str] = {}
    for line in config_text.splitlines():
        if line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            have[name] = value
    return sorted(name for name, value in wanted.items() if have.get(name) != value)


def build_kernel(progress: Callable[[str], None], jobs: int | None = None, force: bool = False) -> tuple[Kernel, bool]:
    """Build the kernel for today's source and fragment unless it is there. Returns it and whether
    it was built now. Needs the build packages (BUILD_PACKAGES)."""
    source, text = find_source(), fragment_text()
    cache = cache_dir()
    final = cache / _key(source.version, fragment_hash(text))
    with _build_lock(cache):
        if not force and Kernel(final).binary.is_file() and Kernel(final).release:
            return Kernel(final), False
        for tool in ("make", "gcc", "flex", "bison", "bc"):
            if not shutil.which(tool):
                raise GuestUnavailable(f"`{tool}` is not installed (apt-get install {' '.join(BUILD_PACKAGES)})")
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
        log = work / "build.log"
        try:
            progress(f"unpacking {source.tarball} ({SOURCE_PACKAGE} {source.version})")
            subprocess.run(["tar", "-xaf", str(source.tarball), "-C", str(work)], check=True)
            src = next(p for p in work.iterdir() if p.is_dir())
            _make(src, log, "defconfig")
            with open(src / ".config", "a") as cfg:  # later assignments win: the fragment's
                cfg.write("\n" + text)
            _make(src, log, "olddefconfig")
            missing = missing_options((src / ".config").read_text(), fragment_options(text))
            if missing:
                raise GuestUnavailable(
                    f"{SOURCE_PACKAGE} {source.version} cannot build the lab kernel: "
                    f"{', '.join(missing)} not available for ARCH=um (see {FRAGMENT.name})"
                )
            n = jobs or os.cpu_count() or 1
            progress(f"compiling with {n} jobs (about 5 minutes on 2 cores; log {log})")
            _make(src, log, f"-j{n}", "linux", "modules")
            release = _make(src, log, "-s", "kernelrelease").strip()
            out = work / "out"
            out.mkdir()
            # modules.builtin: modprobe and the node checks then know what is built in
            _make(src, log, "modules_install", f"INSTALL_MOD_PATH={out / 'modules'}")
            shutil.copy2(src / "linux", out / "linux")
            (out / "build.json").write_text(
                json.dumps(
                    {
                        "release": release,
                        "source_package": SOURCE_PACKAGE,
                        "source_version": source.version,
                        "fragment_sha256": hashlib.sha256(text.encode()).hexdigest(),
                        "build_seconds": round(time.monotonic() - t0, 1),
                    },
                    indent=1,
                )
                + "\n"
            )
            if final.exists():
                shutil.rmtree(final)
            out.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        progress(f"built {final / 'linux'} ({release}) in {time.monotonic() - t0:.0f}s")
        return Kernel(final), True


def _init_script(tmp: Path, kernel: Kernel, out: Path, err: Path, rc: Path) -> str:
    """The guest's init: private scratch space, then the launcher, then power off."""
    q = shlex.quote
    return f"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
exec >>{q(str(err))} 2>&1
set -e
mount -t proc proc /proc
trap 'echo o > /proc/sysrq-trigger' EXIT
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev      # DEVTMPFS_MOUNT mounts it at boot
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mkdir -p /run/guest/etc.upper /run/guest/etc.work /run/guest/etc /run/netns
mount -t overlay etc -o lowerdir=/etc,upperdir=/run/guest/etc.upper,workdir=/run/guest/etc.work /etc || {{
  cp -a /etc/. /run/guest/etc/ && mount --bind /run/guest/etc /etc; }}
mount -t tmpfs modules /lib/modules
ln -s {q(str(kernel.modules))} /lib/modules/{q(kernel.release)}
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
ip link set lo up
set +e
sh {q(str(tmp / "launch.sh"))} >>{q(str(out))} 2>>{q(str(err))}
echo $? > {q(str(rc))}
sync
"""


MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


def memory_bytes(memory: str) -> int:
    """`mem=` as UML reads it: a number with an optional K, M or G."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(memory[:-1]) * units[memory[-1].upper()] if memory[-1:].upper() in units else int(memory)


def room_for_mappings(memory: str) -> None:
    """UML maps a guest process's pages into its host process one by one: a guest process with
    more than vm.max_map_count (65,530 by default, 256 MB of 4 KB pages) scattered pages is
    killed ("UML ran out of memory on the host side"); the scale bench's daemon was, at 150,000
    to 310,000 sessions. The host's limit is raised (never lowered) to one mapping per page of
    the guest's memory: a cap, not an allocation."""
    try:
        current = int(MAX_MAP_COUNT.read_text())
        wanted = memory_bytes(memory) // 4096 + 65536
        if current < wanted:
            MAX_MAP_COUNT.write_text(str(wanted))
            print(f"mplsorch lab: vm.max_map_count {current} -> {wanted} (a {memory} guest's pages)", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"mplsorch lab: vm.max_map_count not raised: {exc}", file=sys.stderr)


def run_in_uml(kernel: Kernel, inner_args: list[str], memory: str) -> GuestResult:
    """Boot KERNEL and run `python -m orchestrator lab run INNER_ARGS` there, in the same cwd.
    Ctrl-C or SIGTERM (raised here as KeyboardInterrupt) kills the whole guest."""
    room_for_mappings(memory)
    # not under /tmp or /run: the guest mounts its own tmpfs there and would not see these files
    with tempfile.TemporaryDirectory(prefix="mplsorch-uml-", dir="/var/tmp") as tmp_name:
        tmp = Path(tmp_name)
        out, err, rc, result = tmp / "stdout", tmp / "stderr", tmp / "rc", tmp / "result.json"
        for f in (out, err):
            f.touch()
        env = guest_env({RESULT_ENV: str(result)})
        (tmp / "launch.sh").write_text(launcher(os.getcwd(), env, inner_args))
        init = tmp / "init"
        init.write_text(_init_script(tmp, kernel, out, err, rc))
        init.chmod(0o755)
        (tmp / "uml").mkdir()
        argv = [
            str(kernel.binary),
            f"mem={memory}",
            "root=/dev/root",
            "rootfstype=hostfs",
            "rootflags=/",
            "rw",
            f"init={init}",
            f"uml_dir={tmp / 'uml'}",
            "umid=lab",
            "con=null",
            "con0=null,fd:1",
            "quiet",
        ]
        relays = [FileRelay(out, sys.stdout), FileRelay(err, sys.stderr)]
        sys.stdout.flush()
        sys.stderr.flush()
        with open(tmp / "console", "wb") as console:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": _memory_dir(tmp)},
            )
            for r in relays:
                r.start()
            try:
                code = proc.wait()
            except BaseException:
                _kill_group(proc)
                raise
            finally:
                for r in relays:
                    r.finish()
                _kill_group(proc)  # UML's helper processes, should any outlive the kernel
        data = read_result(result)
        if data is None and not rc.exists():
            tail = (tmp / "console").read_text(errors="replace").splitlines()[-20:]
            sys.stderr.write(
                "mplsorch lab: the UML guest ended before its command did; its console:\n" + "\n".join(tail) + "\n"
            )
        return GuestResult(code, data)


def _memory_dir(fallback: Path) -> str:
    """Where UML keeps the file that backs the guest's memory: tmpfs, so that the host never
    writes guest memory back to disk."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else str(fallback)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
