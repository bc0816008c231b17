"""Run untrusted Python programs in a sandbox: Linux namespaces, an unprivileged user, rlimits.

`run_python(source, stdin, limits)` runs one program and returns its output and how it ended,
once every process of the run has ended. Each run has its own namespaces (made with
unshare(2) through ctypes; no setuid helper, no root needed):

    trainer --Popen, new session--> launcher: new user, pid, mount, network, IPC and UTS
        namespaces; the trainer maps its root to uid 65534 outside (the trainer's own uid
        when it is not root), then sends the job
        --> supervisor: pid 1 of the new pid namespace; makes the program's root (below)
            and pivot_root(2)s into it, starts the program, reports "ready" and at the end
            its exit status
            --> the program: uid 1000 of a nested user namespace, no capabilities

The launcher and the supervisor are this very file, run by the sandbox interpreter.

What is guaranteed (tests/test_sandbox.py tries each point with a hostile program, as root):
- What is visible: a minimal root, a fresh tmpfs holding bind mounts of the host, entered
  with pivot_root(2), the old root detached (nothing else of the host is left in the mount
  namespace). It shows, at their host paths: /usr, /bin, /sbin, /lib* (bound where
  directories, recreated where links), the interpreter's own directories outside them (its
  prefixes, sys.path, site-packages and the directories of the shared libraries it loads,
  as the interpreter reports them, asked once per interpreter: e.g. a virtualenv's or
  /opt/python's prefix, not the directory around it), `Limits.extra_dirs`, and the links
  on the way to these; /etc holds only ld.so.cache (ld.so.preload), localtime and a
  passwd and group naming the sandbox's users; /dev only null, zero, full, random,
  urandom, fd, stdin, stdout, stderr and shm; a /proc of the run; /tmp (the working
  directory /tmp/work is in it). Home directories, data, checkouts, run directories,
  other mounts (/home, /root, /srv, /opt, /mnt, /var, ...) are absent. Within what it
  shows, the program reads what the sandbox user may read (world-readable files, as
  root uid 65534's view; as another user, that user's files too).
- Files: every mount is read-only and nosuid inside the sandbox; /tmp and /dev/shm are
  fresh tmpfs mounts (size `files_mb` each). The program cannot create, change or delete
  any file outside them; they vanish with the run (nothing is written to the host's disk).
  The program's user owns nothing outside, holds no capability, and cannot undo the
  mounts (a namespace it makes itself copies them locked).
- Network: a new network namespace with only a loopback device, down: no socket can reach
  another host nor any port of this one (not even 127.0.0.1); abstract Unix sockets are per
  namespace. A path-named Unix socket of the host is reachable only if it lies in a shown
  directory (above) and is world-writable.
- Processes: a new pid namespace. The supervisor is its init: when the program's main
  process exits, or the run is killed (wall time, output), the kernel kills every process
  left in the namespace, daemons and setsid() escapees included. No fork can outlive the
  run. RLIMIT_NPROC (`processes`, threads included) is counted per run: the kernel counts
  it per user namespace (Linux 5.14+), and each run has its own.
- Time: wall clock (`time_s`, from the program's start; killed after it), and as a backstop
  CPU time per process (RLIMIT_CPU: `time_s` rounded up, plus one second, so that the wall
  clock, which starts a little after the program, ends a busy loop first). A program the
  CPU limit stops (SIGXCPU) ends as "timeout" too.
- Memory: RLIMIT_AS (`memory_mb`) per process, and the tmpfs sizes. A run of several
  processes can use up to processes x memory_mb; its processes are the kernel's first
  choice when memory runs out (oom_score_adj 1000).
- Output: stdout and stderr are read as they come; past `output_bytes` in total the run is
  killed (status "output_limit") and at most that much is kept. Files: RLIMIT_FSIZE.
- A program that leaves a process running when its main process exits fails ("error",
  `leftover`); the process is killed all the same.
- Environment: only PATH, HOME, TMPDIR, LANG and thread-count variables; HOME and TMPDIR
  are the private working directory; the interpreter runs isolated (-I). /proc shows only
  the run's own processes. The supervisor is not dumpable (no ptrace from the program).

The interpreter (`python`, default the system's python3 on /usr/local/bin:/usr/bin:/bin)
must be readable by the sandbox user, path included: one under /root (mode 700, e.g.
pyenv's) is not. The program runs in it, so what it can import is that interpreter's
standard library and packages (a .pth file's additions only where they are shown). A
shared library that only an extension module loads, from a directory outside those shown,
is missing: name its directory in `extra_dirs`. A directory the sandbox cannot show (/,
/etc, or one under /tmp, /dev or /proc, which the sandbox makes itself) raises
`SandboxError` naming it.

Not covered: kernel exploits (there is no seccomp filter), CPU and memory bandwidth taken
from other work, reading what the shown system directories hold. Needs: Linux 5.14+ with
user namespaces enabled (mount_setattr, per-namespace RLIMIT_NPROC, pidfd), and a /proc
without masked paths (mounting the run's /proc needs one). A setup failure (not the
program's doing) raises `SandboxError`, never scores a program.
This module uses the standard library only: its source is also the supervisor.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import resource
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
OUTSIDE_UID = 65534  # who the sandbox is, seen from outside, when the trainer runs as root
PROGRAM_UID = 1000  # the program's uid inside its user namespace
WORKDIR = "/tmp/work"  # inside the sandbox: HOME, TMPDIR and current directory
# The program's root (a fresh tmpfs, read-only, then pivot_root) shows only these host paths,
# read-only at the same place, and what the interpreter needs (root_plan); the sandbox
# makes /tmp, /dev/shm (writable), /proc, /etc/passwd and /etc/group itself.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # or links
HOST_FILES = ("/etc/ld.so.cache", "/etc/ld.so.preload", "/etc/localtime", "/dev/null",
              "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")  # those that exist
DEV_LINKS = (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
             ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2"))
NEW_ROOT = "/tmp"  # where the supervisor assembles the root, in its own mount namespace
SETUP_TIMEOUT_S = 30.0  # namespaces + mounts + interpreter start; normally ~0.1 s
KILL_WAIT_S = 30.0  # for the kernel to end a killed run's processes; normally milliseconds


@dataclass(frozen=True)
class Limits:
    """Per run: wall seconds (the CPU limit is the same, rounded up), address space per
    process, stdout+stderr bytes, processes+threads, size of each writable tmpfs; and
    `extra_dirs`, existing directories the program may read besides the interpreter's
    (absolute paths, shown read-only at the same place; a task's packages, never its data)."""

    time_s: float = 4.0
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    processes: int = 16
    files_mb: int = 64
    extra_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("time_s", "memory_mb", "output_bytes", "processes", "files_mb"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{key}: must be a number > 0, got {value!r}")
        if isinstance(self.extra_dirs, (str, bytes)):
            raise ValueError(f"extra_dirs: must be a list of paths, got {self.extra_dirs!r}")
        dirs = tuple(str(d) for d in self.extra_dirs)
        for d in dirs:
            if not (os.path.isabs(d) and os.path.isdir(d)):
                raise ValueError(f"extra_dirs: {d!r} is not an existing directory (an "
                                 f"absolute path)")
        object.__setattr__(self, "extra_dirs", dirs)


@dataclass
class RunResult:
    """How a run ended. status: "ok" (exit code 0 and no process left running), "error"
    (another exit code, killed by a signal: returncode 128 + signal, or processes left
    running), "timeout" (wall clock, or the CPU limit's SIGXCPU) or "output_limit"."""

    status: str
    returncode: int | None
    stdout: bytes
    stderr: bytes
    seconds: float  # wall time of the program (setup excluded)
    leftover: int = 0  # processes still running when the main one exited (then killed)


class SandboxError(RuntimeError):
    """The sandbox could not be set up (a fault of the machine or the configuration)."""


def resolve_python(python: str) -> str:
    """The absolute path of the sandbox interpreter `python` (a name looked up on SAFE_PATH,
    or a path)."""
    found = shutil.which(python, path=SAFE_PATH)
    if found is None:
        raise SandboxError(f"sandbox interpreter {python!r} not found on {SAFE_PATH}")
    return os.path.abspath(found)


# Run as `python -I -S -c`: what the interpreter reads, by its own account (site-packages
# without running site, so that .pth files cannot add a checkout), a virtualenv's prefix
# (found as site finds it: a pyvenv.cfg beside or above the executable's directory), and
# the directories of the shared libraries it has loaded.
_PROBE = """\
import json, os, site, sys
dirs = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path,
        *site.getsitepackages()]
bin_dir = os.path.dirname(os.path.abspath(sys.executable))
venv = os.path.dirname(bin_dir)
if any(os.path.isfile(os.path.join(d, "pyvenv.cfg")) for d in (bin_dir, venv)):
    dirs.append(venv)
with open("/proc/self/maps") as f:
    for line in f:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
            dirs.append(os.path.dirname(fields[5].rstrip("\\n")))
print(json.dumps(dirs))
"""


@functools.cache
def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """The directories the interpreter `python` uses: asked once per interpreter path."""
    try:
        out = subprocess.run([python, "-I", "-S", "-c", _PROBE], capture_output=True,
                             env={"PATH": SAFE_PATH}, cwd="/", timeout=SETUP_TIMEOUT_S,
                             check=True).stdout
        return tuple(json.loads(out))
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise SandboxError(f"asking the sandbox interpreter {python!r} for its directories: "
                           f"{e}") from None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _resolve(path: str, links: dict[str, str], depth: int = 0) -> str:
    """The real path of `path` (absolute), resolved one component at a time as the kernel
    does; each symbolic link met is recorded in `links` (its place: {target}), so that the
    new root can resolve `path` the same way."""
    if depth > 40:
        raise SandboxError(f"too many levels of symbolic links in {path!r}")
    done = "/"
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            done = os.path.dirname(done)
            continue
        here = os.path.join(done, part)
        if os.path.islink(here):
            links[here] = os.readlink(here)
            done = _resolve(os.path.join(done, links[here]), links, depth + 1)
        else:
            done = here
    return done


@functools.cache
def root_plan(python: str, extra_dirs: tuple[str, ...] = ()) -> dict:
    """What the root of a run of `python` (an absolute path) is made of: "binds", host
    directories and files shown read-only at the same place (the SYSTEM_DIRS that are
    directories, the interpreter's own directories and the directories of its shared
    libraries where they lie outside those, `extra_dirs`, HOST_FILES), and "links",
    symbolic links made as on the host ([place, target]: the SYSTEM_DIRS that are links,
    links on the way to the paths above, DEV_LINKS). Raises SandboxError for a path the
    sandbox cannot show: "/", or one that its own /tmp, /dev, /proc or /etc would hide."""
    links: dict[str, str] = dict(DEV_LINKS)
    binds = {d for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)}
    links.update((d, os.readlink(d)) for d in SYSTEM_DIRS if os.path.islink(d))
    binds.add(os.path.dirname(_resolve(python, links)))
    for path in (*_interpreter_dirs(python), *extra_dirs):
        if os.path.isabs(path) and os.path.exists(path):
            real = _resolve(path, links)
            binds.add(real if os.path.isdir(real) else os.path.dirname(real))
    binds.update(_resolve(f, links) for f in HOST_FILES if os.path.exists(f))
    top: list[str] = []
    for path in sorted(binds):
        if not any(_under(path, t) for t in top):
            top.append(path)
    for path in top:
        if path in ("/", "/etc") or (path not in HOST_FILES and any(
                _under(path, own) for own in ("/tmp", "/dev", "/proc"))):
            raise SandboxError(f"the sandbox cannot show {path!r} (needed by {python!r} or "
                               f"named in extra_dirs): it is / or hidden by the sandbox's "
                               f"own /tmp, /dev, /proc or /etc")
    return {"binds": top, "links": sorted([place, target] for place, target in links.items()
                                          if not any(_under(place, t) for t in top))}


def _id_maps(pid: int) -> None:
    """Map root of the run's new user namespace to OUTSIDE_UID (trainer is root) or to the
    trainer's own uid; written from outside, as only the parent namespace can."""
    uid, gid = ((OUTSIDE_UID, OUTSIDE_UID) if os.geteuid() == 0
                else (os.geteuid(), os.getegid()))
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                       ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def run_python(source: str, stdin: bytes = b"", limits: Limits | None = None,
               python: str = "python3", files: dict[str, str] | None = None) -> RunResult:
    """Run `source` as main.py in a fresh sandbox with `stdin` as its standard input; `files`
    are extra text files put next to it. When this returns, every process of the run has
    ended. Raises SandboxError if the sandbox fails to start."""
    limits = limits or Limits()
    exe = resolve_python(python)
    job = json.dumps({"python": exe, "limits": asdict(limits), "stdin": stdin.decode("latin-1"),
                      "files": {**(files or {}), "main.py": source},
                      "root": root_plan(exe, limits.extra_dirs)}).encode()
    with _Run(exe) as run:
        setup_deadline = time.monotonic() + SETUP_TIMEOUT_S
        run.expect("unshared", setup_deadline)
        try:
            _id_maps(run.proc.pid)
            run.proc.stdin.write(job)
            run.proc.stdin.close()
        except OSError as e:
            run.fail(f"{type(e).__name__}: {e}")
        run.watch_supervisor(int(run.expect("supervisor", setup_deadline).split()[1]))
        run.expect("ready", setup_deadline)
        started = time.monotonic()
        end = run.pump(started + limits.time_s, lambda: run.output_bytes() > limits.output_bytes)
        seconds = time.monotonic() - started
        stdout = bytes(run.data["stdout"][:limits.output_bytes])
        stderr = bytes(run.data["stderr"][:limits.output_bytes])
        if end == "timeout":
            return RunResult("timeout", None, stdout, stderr, seconds)
        if end == "done":
            return RunResult("output_limit", None, stdout, stderr, seconds)
        exit_line = run.line("exit")
        if exit_line is None:
            run.fail("the supervisor ended without the program's exit status")
        code, left = (int(x) for x in exit_line.split()[1:3])
        if code == 128 + signal.SIGXCPU:
            return RunResult("timeout", code, stdout, stderr, seconds, left)
        return RunResult("ok" if code == 0 and not left else "error", code, stdout, stderr,
                         seconds, left)


class _Run:
    """One sandbox run seen from the trainer: the launcher process, its stdout, stderr and
    status pipes (read together without blocking), and the supervisor to kill at the end."""

    def __init__(self, python: str):
        with open(__file__, encoding="utf-8") as f:
            launcher = f.read()
        status_r, status_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-S", "-c", launcher, str(status_w)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                start_new_session=True, env={"PATH": SAFE_PATH}, cwd="/")
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        self.supervisor: int | None = None  # a pidfd
        self.sel = selectors.DefaultSelector()
        self.data = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
        self.status_r = status_r
        for name, fd in (("stdout", self.proc.stdout.fileno()),
                         ("stderr", self.proc.stderr.fileno()), ("status", status_r)):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, name)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self.sel.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()
        os.close(self.status_r)
        self.proc.wait()
        if self.supervisor is not None:
            os.close(self.supervisor)

    def watch_supervisor(self, pid: int) -> None:
        try:
            self.supervisor = os.pidfd_open(pid)
        except ProcessLookupError:
            pass  # it has ended already, and its namespace with it

    def kill(self) -> None:
        """SIGKILL the supervisor, pid 1 of the run's pid namespace (the kernel then kills
        every process in it, and it counts as ended only once they are all gone), wait for
        it, and kill the launcher's process group."""
        if self.supervisor is not None:
            try:
                signal.pidfd_send_signal(self.supervisor, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not select.select([self.supervisor], [], [], KILL_WAIT_S)[0]:
                raise SandboxError(f"the sandbox's processes did not end in {KILL_WAIT_S} s")
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def pump(self, deadline: float, until) -> str:
        """Read until `until()` holds ("done"), every pipe is closed ("closed") or the
        deadline passes ("timeout")."""
        while not until():
            if not self.sel.get_map():
                return "closed"
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            for key, _ in self.sel.select(left):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    self.data[key.data] += chunk
                else:
                    self.sel.unregister(key.fd)
        return "done"

    def output_bytes(self) -> int:
        return len(self.data["stdout"]) + len(self.data["stderr"])

    def line(self, word: str) -> str | None:
        """The first complete status line that starts with `word`."""
        complete = self.data["status"].decode(errors="replace").split("\n")[:-1]
        return next((ln for ln in complete if ln.split(" ", 1)[0] == word), None)

    def expect(self, word: str, deadline: float) -> str:
        """Wait for the status line starting with `word`; a setup error, the pipes closing or
        the deadline raise SandboxError."""
        self.pump(deadline, lambda: self.line(word) is not None or self.line("setup"))
        found = self.line(word)
        if found is None:
            self.fail(self.line("setup") or f"no {word!r} from the sandbox in time")
        return found

    def fail(self, detail: str) -> None:
        self.kill()
        self.pump(time.monotonic() + 1.0, lambda: False)
        err = self.data["stderr"].decode(errors="replace")[-2000:]
        raise SandboxError(f"the code sandbox failed ({detail}); stderr: {err!r}")


# ---------------------------------------------------------------- the supervisor (in the sandbox)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 1 << 18
MNT_DETACH = 2
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture but alpha
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, fstype: str, target: str, flags: int, data: str) -> None:
    _check(libc.mount(fstype.encode(), target.encode(), fstype.encode(), flags, data.encode()),
           f"mount {fstype} on {target}")


def _setattr_readonly(libc, path: str) -> None:
    """Make the mount at `path` and every mount below it read-only and nosuid."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    _check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                        ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr),
                        ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr {path} read-only")


def _setup_mounts(libc, job: dict) -> None:
    """Make the program's root: a tmpfs at NEW_ROOT holding the plan's bind mounts and links
    (root_plan), /etc/passwd and /etc/group, all made read-only and nosuid; over it fresh
    /tmp and /dev/shm (writable) and a /proc of the run's own pid namespace. Then pivot_root
    into it and detach the old root: nothing else of the host is left in the namespace."""
    plan = job["root"]
    # opened first: NEW_ROOT's tmpfs covers what the host has there
    sources = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC)) for path in plan["binds"]]
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _mount(libc, "tmpfs", NEW_ROOT, MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for d in ("tmp", "proc", "dev/shm", "etc"):
        os.makedirs(f"{NEW_ROOT}/{d}", exist_ok=True)
    for path, fd in sources:
        target = NEW_ROOT + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.mkdir(target)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        _check(libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None,
                          MS_BIND | MS_REC, None), f"bind mount {path}")
        os.close(fd)
    for place, target in plan["links"]:
        os.makedirs(os.path.dirname(NEW_ROOT + place), exist_ok=True)
        os.symlink(target, NEW_ROOT + place)
    for name, text in (("passwd", f"sandbox:x:{PROGRAM_UID}:{PROGRAM_UID}::{WORKDIR}:/bin/sh\n"
                                  f"nobody:x:65534:65534::/nonexistent:/bin/false\n"),
                       ("group", f"sandbox:x:{PROGRAM_UID}:\nnogroup:x:65534:\n")):
        with open(f"{NEW_ROOT}/etc/{name}", "x") as f:
            f.write(text)
    _setattr_readonly(libc, NEW_ROOT)
    size = f"size={int(job['limits']['files_mb'])}m"
    for d in ("tmp", "dev/shm"):
        _mount(libc, "tmpfs", f"{NEW_ROOT}/{d}", MS_NOSUID | MS_NODEV, f"{size},mode=1777")
    _mount(libc, "proc", f"{NEW_ROOT}/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "")
    os.chdir(NEW_ROOT)
    _check(libc.pivot_root(b".", b"."), "pivot_root")  # the old root is now stacked on it
    _check(libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def _become_program_user(libc) -> None:
    """Enter a nested user namespace as PROGRAM_UID: no capabilities over the sandbox's
    mounts or namespaces, its own RLIMIT_NPROC count."""
    _check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{PROGRAM_UID} 0 1"),
                       ("gid_map", f"{PROGRAM_UID} 0 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    os.setresgid(PROGRAM_UID, PROGRAM_UID, PROGRAM_UID)
    os.setresuid(PROGRAM_UID, PROGRAM_UID, PROGRAM_UID)


def _exec_program(libc, job: dict, err_w: int) -> None:
    """In the forked child: drop to the program user, apply the limits, exec the program.
    Any failure is written to `err_w` (close-on-exec: a successful exec closes it silently)."""
    try:
        lim = job["limits"]
        _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")  # owns its /proc/self
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        _become_program_user(libc)
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        cpu = math.ceil(lim["time_s"]) + 1  # a backstop: the wall clock comes first
        mem = int(lim["memory_mb"]) << 20
        for rlim, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                            (resource.RLIMIT_AS, (mem, mem)),
                            (resource.RLIMIT_NPROC, (int(lim["processes"]),) * 2),
                            (resource.RLIMIT_FSIZE, ((int(lim["files_mb"]) << 20),) * 2),
                            (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(rlim, value)
        os.chdir(WORKDIR)
        fd = os.open("stdin.txt", os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        env = {"PATH": SAFE_PATH, "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        os.execve(job["python"], [job["python"], "-I", "main.py"], env)
    except BaseException as e:  # noqa: BLE001 - reported to the supervisor, then exit
        os.write(err_w, f"{type(e).__name__}: {e}".encode()[:1000])
    os._exit(127)


def _launch() -> None:
    """The process the trainer starts: unshare the namespaces, wait for the trainer to map
    our uid and send the job, fork the supervisor (pid 1 of the new pid namespace), wait."""
    status = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    try:
        libc = _libc()
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
                            | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
        status.write("unshared\n")
        job = json.loads(sys.stdin.buffer.read())  # sent once the uid map is written
        os.setresgid(0, 0, 0)  # become the mapped root: files we create are then its
        os.setresuid(0, 0, 0)
        pid = os.fork()
    except BaseException as e:  # noqa: BLE001 - reported to the trainer
        status.write(f"setup error: {type(e).__name__}: {e}\n")
        os._exit(1)
    if pid == 0:
        _supervise(libc, job, status)
    status.write(f"supervisor {pid}\n")
    os.waitpid(pid, 0)
    os._exit(0)


def _supervise(libc, job: dict, status) -> None:
    """pid 1 of the run: set up mounts and the working directory, start the program,
    report "ready", then "exit N" when it ends. Its exit kills the whole namespace."""
    try:
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")
        _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable")
        _setup_mounts(libc, job)
        os.makedirs(WORKDIR, mode=0o700)
        for name, text in job["files"].items():
            with open(os.path.join(WORKDIR, name), "w", encoding="utf-8") as f:
                f.write(text)
        with open(os.path.join(WORKDIR, "stdin.txt"), "wb") as f:
            f.write(job["stdin"].encode("latin-1"))
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            status.close()
            os.close(err_r)
            _exec_program(libc, job, err_w)
        os.close(err_w)
        err = b"".join(iter(lambda: os.read(err_r, 4096), b""))
        if err:
            raise RuntimeError(f"starting the program: {err.decode(errors='replace')}")
        status.write("ready\n")
    except BaseException as e:  # noqa: BLE001 - reported to the trainer
        status.write(f"setup error: {type(e).__name__}: {e}\n")
        os._exit(1)
    _, wstatus = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wstatus)
    status.write(f"exit {code if code >= 0 else 128 - code} {_still_running()}\n")
    os._exit(0)


def _still_running() -> int:
    """Processes of the run other than the supervisor that are still running (not zombies)."""
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit() and name != "1":
            try:
                with open(f"/proc/{name}/stat") as f:
                    n += f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except (OSError, IndexError):
                pass  # it ended meanwhile
    return n


if __name__ == "__main__":
    _launch()
