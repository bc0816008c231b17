"""The code verifier and its sandbox, against adversarial programs (real subprocesses and
namespaces; nothing mocked). Each hostile program must be contained, score 0, and leave no
process behind; the process running the tests keeps running."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kimi_rl.config import RewardConfig, TrainConfig
from kimi_rl.data.problems import Problem
from kimi_rl.rewards.code import CodeVerifier, extract_program
from kimi_rl.rewards.sandbox import Limits, SandboxError, run_python
from kimi_rl.rewards.verify import get_verifier
from kimi_rl.rollout.samples import Sample, score_groups

FAST = Limits(time_s=1.0, memory_mb=256, output_bytes=64 << 10, processes=8, files_mb=8)
ADD = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}]


def _namespaces_refused() -> str | None:
    """Why the kernel refuses the sandbox's namespaces here (e.g. a container whose seccomp
    profile forbids unshare), or None. Any other sandbox failure fails the tests."""
    try:
        run_python("pass", limits=FAST)
    except SandboxError as e:
        if "unshare" in str(e):
            return str(e)
    return None


_REFUSED = _namespaces_refused()
pytestmark = pytest.mark.skipif(_REFUSED is not None, reason=f"no sandbox here: {_REFUSED}")


def problem(tests=ADD, pid="add") -> Problem:
    return Problem(pid, "Add two integers.", "-", task="code", tests=json.dumps(tests))


def fenced(code: str) -> str:
    return f"Reasoning first.\n\n```python\n{textwrap.dedent(code).strip()}\n```\n"


def score(code: str, tests=ADD, limits: Limits = FAST) -> float:
    return CodeVerifier(limits, workers=1)(problem(tests), fenced(code))


def sandbox_processes() -> list[str]:
    """Host processes that belong to a sandbox run: the programs (python -I main.py) and the
    launchers (whose command line holds this module's source)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.endswith(b"\0-I\0main.py\0") or b"Run untrusted Python programs" in cmd:
            found.append(f"{pid}: {cmd[:80]!r}")
    return found


@pytest.fixture(autouse=True)
def no_process_left():
    yield
    assert sandbox_processes() == []


# ---------------------------------------------------------------- honest programs

ADD_OK = "a, b = map(int, input().split())\nprint(a + b)"


def test_correct_program_scores_one_and_wrong_ones_zero():
    assert score(ADD_OK) == 1.0
    assert score("a, b = map(int, input().split())\nprint(a - b)") == 0.0  # wrong
    assert score("print(3)") == 0.0  # right on the first test only
    assert score("a, b = map(int, input().split()\nprint(a + b)") == 0.0  # syntax error
    assert score(ADD_OK + "\nraise SystemExit(1)") == 0.0  # right output, bad exit code
    assert score(ADD_OK + "\nprint()\n") == 1.0  # trailing blank lines do not count
    verifier = CodeVerifier(FAST, workers=1)
    assert verifier(problem(), "print(3)") == 0.0  # no fenced block
    assert verifier(problem(), fenced(ADD_OK).replace("```python", "```js")) == 0.0


def test_fraction_reward_counts_tests_passed():
    tests = [*ADD, {"input": "0 0\n", "output": "1\n"}]
    v = CodeVerifier(FAST, workers=1, reward="fraction")
    assert v(problem(tests), fenced(ADD_OK)) == pytest.approx(2 / 3)
    assert CodeVerifier(FAST, workers=1)(problem(tests), fenced(ADD_OK)) == 0.0


def test_function_call_form():
    tests = [{"fn_name": "add", "args": [1, 2], "output": 3},
             {"fn_name": "add", "args": [[1], [2]], "output": [1, 2]}]
    assert score("def add(a, b):\n    print('noise')\n    return a + b", tests) == 1.0
    assert score("class Solution:\n    def add(self, a, b):\n        return a + b", tests) == 1.0
    assert score("def add(a, b):\n    return a", tests) == 0.0
    assert score("def plus(a, b):\n    return a + b", tests) == 0.0


def test_fenced_block_extraction_rules():
    assert extract_program("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_program("```Python3\nc = 3\n```") == "c = 3\n"
    assert extract_program("  ```python\n  d = 4\n  ```") == "  d = 4\n"
    # a block left open does not count: the last complete one does
    assert extract_program("```python\na = 1\n```\n```python\nb = 2\n") == "a = 1\n"
    assert extract_program("```bash\nls\n```") is None
    assert extract_program("```\nprint(1)\n```") is None  # no language: not python
    assert extract_program("no code here") is None
    assert extract_program("```markdown\n```python\nx = 1\n```\n") is None  # inside a block
    assert extract_program("```python\n" * 20000) is None  # one pass: no quadratic rescans


def test_bad_test_cases_are_data_errors():
    v = CodeVerifier(FAST, workers=1)
    with pytest.raises(ValueError, match="'nope' has no test cases"):
        v(Problem("nope", "p", "a", task="code"), fenced(ADD_OK))
    with pytest.raises(ValueError, match="'bad' test 0"):
        v(problem([{"input": 1, "output": "1"}], pid="bad"), fenced(ADD_OK))


def test_config_wiring_and_errors():
    v = get_verifier("code", RewardConfig(sandbox_time_s=2.5, verify_workers=3))
    assert isinstance(v, CodeVerifier) and v.workers == 3 and v.limits.time_s == 2.5
    reward = OmegaConf.structured(TrainConfig).reward  # as the loop passes it
    v = get_verifier("code", reward)
    assert v.workers == (os.cpu_count() or 1) and v.limits == Limits()
    with pytest.raises(ValueError, match="reward.sandbox_memory_mb"):
        get_verifier("code", RewardConfig(sandbox_memory_mb=0))
    with pytest.raises(ValueError, match="reward.verify_workers"):
        get_verifier("code", RewardConfig(verify_workers=0))
    with pytest.raises(ValueError, match="reward.code_reward"):
        get_verifier("code", RewardConfig(code_reward="most"))
    with pytest.raises(SandboxError, match="no-such-python"):
        get_verifier("code", RewardConfig(sandbox_python="no-such-python"))


def test_limits_are_in_place_inside():
    run = run_python(textwrap.dedent("""
        import os, resource
        print([resource.getrlimit(getattr(resource, 'RLIMIT_' + k))
               for k in ('CPU', 'AS', 'NPROC', 'FSIZE')])
        print(os.getuid(), os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'])
        print(sorted(p for p in os.listdir('/proc') if p.isdigit()))
    """), limits=FAST)
    assert run.status == "ok", run.stderr
    lines = run.stdout.decode().splitlines()
    assert lines[0] == str([(2, 3), (256 << 20,) * 2, (8, 8), (8 << 20,) * 2])
    assert lines[1] == "1000 /tmp/work /tmp/work /tmp/work"
    assert lines[2] == "['1', '2']"  # its own pid namespace: the supervisor and itself


# ---------------------------------------------------------------- hostile programs

def test_infinite_loops_time_out():
    t0 = time.monotonic()
    assert score("while True:\n    pass") == 0.0
    assert score("import time\nwhile True:\n    time.sleep(1)") == 0.0  # wall, not CPU
    run = run_python("while True:\n    pass", limits=FAST)
    assert run.status == "timeout" and run.seconds >= FAST.time_s
    assert time.monotonic() - t0 < 30  # each one stopped near its 1 s limit


def test_the_cpu_limit_ends_a_run_as_a_timeout():
    # The wall clock normally ends a busy loop; a program stopped by its CPU limit (here it
    # lowers its own) is a timeout as well, not an error.
    run = run_python(textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, (1, 2))
        while True:
            pass
    """), limits=Limits(time_s=20.0, memory_mb=256, output_bytes=1024, processes=4,
                          files_mb=1))
    assert run.status == "timeout" and run.seconds < 20.0, run


def test_fork_bomb_is_contained():
    bomb = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    assert score(bomb) == 0.0
    # the process limit is per run: two runs at once each get all of it
    counter = textwrap.dedent("""
        import os, time
        n = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
            except OSError:
                break
            n += 1
        print(n)
    """)
    runs = [None, None]

    def go(i):
        runs[i] = run_python(counter, limits=FAST)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for run in runs:  # main process + 7 children = FAST.processes; the sleepers were killed
        assert run.stdout == b"7\n" and run.status == "error" and run.leftover == 7


def test_memory_bomb_is_contained():
    assert score("x = bytearray(1 << 30)\n" + ADD_OK) == 0.0  # 1 GiB > 256 MiB
    assert score("x = []\nwhile True:\n    x.append(bytearray(16 << 20))") == 0.0
    run = run_python("x = bytearray(1 << 30)", limits=FAST)
    assert run.status == "error" and b"MemoryError" in run.stderr
    run = run_python("open('big', 'wb').write(bytes(16 << 20))", limits=FAST)  # > files_mb
    assert run.status == "error"


def test_huge_output_is_cut_while_reading():
    assert score(ADD_OK + "\nwhile True:\n    print('x' * 10000)") == 0.0
    run = run_python("import sys\nwhile True:\n    sys.stderr.write('y' * 10000)", limits=FAST)
    assert run.status == "output_limit"
    assert len(run.stdout) + len(run.stderr) <= 2 * FAST.output_bytes
    assert run.seconds < FAST.time_s  # stopped by the output limit, not by the clock


@pytest.fixture(params=["tmp", "rootfs"])
def victim_dir(request, tmp_path):
    """A directory anyone may write to (mode 777, sentinel 666), so that only the sandbox
    protects it: in /tmp (hidden by the sandbox's own /tmp) or elsewhere on the root
    filesystem (visible, read-only)."""
    if request.param == "tmp":
        path = tmp_path / "victim"
        path.mkdir()
    else:
        try:
            path = Path(tempfile.mkdtemp(prefix="kimi_rl_sandbox_test_", dir="/var/lib"))
        except OSError:
            pytest.skip("cannot create a directory under /var/lib")
    os.chmod(path, 0o777)
    (path / "sentinel").write_text("keep me")
    os.chmod(path / "sentinel", 0o666)
    yield path
    if request.param == "rootfs":
        for p in path.iterdir():
            p.unlink()
        path.rmdir()


def test_files_outside_cannot_be_written_or_deleted(victim_dir):
    marker = f"kimi_rl_escape_{uuid.uuid4().hex}"
    program = f"""
        import ctypes, os, shutil, subprocess
        d = {str(victim_dir)!r}

        def own_namespaces():  # root of a new user + mount namespace: undo the mounts?
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.unshare(0x10000000 | 0x00020000) == 0
            open("/proc/self/setgroups", "w").write("deny")
            open("/proc/self/uid_map", "w").write("0 1000 1")
            libc.umount2(b"/tmp", 2)  # to see the host's /tmp (refused: locked mounts)
            libc.mount(None, b"/", None, 32 | 4096, None)  # remount without ro (refused)
            open(d + "/escaped", "w").write("x")

        attempts = [
            lambda: open(d + "/sentinel", "w").write("pwned"),
            lambda: os.remove(d + "/sentinel"),
            lambda: os.rename(d + "/sentinel", d + "/moved"),
            lambda: open(d + "/new_file", "w").write("x"),
            lambda: os.chmod(d + "/sentinel", 0),
            lambda: shutil.rmtree(d),
            lambda: subprocess.run(["rm", "-r", d], check=True),
            lambda: subprocess.run(["touch", d + "/touched"], check=True),
            own_namespaces,
        ]
        won = 0
        for attempt in attempts:
            try:
                attempt()
                won += 1
            except Exception:
                pass
        open("/tmp/{marker}", "w").write("x")  # the sandbox's own /tmp: allowed
        open(os.environ["HOME"] + "/{marker}", "w").write("x")
        print("3" if won else "no")
    """
    assert score(program, tests=[{"input": "", "output": "3"}]) == 0.0
    assert sorted(p.name for p in victim_dir.iterdir()) == ["sentinel"]
    assert (victim_dir / "sentinel").read_text() == "keep me"
    assert not Path("/tmp", marker).exists()
    # and the program did run: it reports that every attempt failed
    run = run_python(textwrap.dedent(program), limits=FAST)
    assert run.stdout == b"no\n", run.stderr


def test_network_is_unreachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = f"""
            import socket
            for host in ("127.0.0.1", "localhost", "8.8.8.8"):
                try:
                    socket.create_connection((host, {port}), timeout=0.3).sendall(b"hi")
                    print("connected")
                    break
                except OSError:
                    pass
            else:
                print("offline")
        """
        assert score(program, tests=[{"input": "", "output": "connected"}]) == 0.0
        run = run_python(textwrap.dedent(program), limits=FAST)
        assert run.stdout == b"offline\n", run.stderr
        with pytest.raises(socket.timeout):
            server.accept()  # no connection ever arrived


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("KIMI_RL_TEST_SECRET", secret)
    program = """
        import os
        found = [v for v in os.environ.values() if v.startswith("s3cret-")]
        for pid in os.listdir("/proc"):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
            except OSError:
                continue
            found += [kv.split("=", 1)[1] for kv in env.split("\\0")
                      if kv.startswith("KIMI_RL_TEST_SECRET=")]
        print(found[0] if found else "none")
    """
    assert score(program, tests=[{"input": "", "output": secret}]) == 0.0
    run = run_python(textwrap.dedent(program), limits=FAST)
    assert run.stdout == b"none\n", run.stderr


def test_background_processes_are_killed_and_fail_the_run():
    marker = f"kimi_rl_sleeper_{uuid.uuid4().hex}"
    program = f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{marker}"],
                         start_new_session=True)
        if os.fork() == 0:  # a classic daemon: double fork, new session
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c",
                                          "import time; time.sleep(300)", "{marker}"])
            os._exit(0)
        time.sleep(0.3)
        print(3)
    """
    assert score(program, tests=[{"input": "1 2\n", "output": "3"}]) == 0.0
    run = run_python(textwrap.dedent(program), limits=FAST)
    assert run.status == "error" and run.returncode == 0 and run.leftover == 2
    time.sleep(0.2)
    left = [pid for pid in filter(str.isdigit, os.listdir("/proc"))
            if marker.encode() in _cmdline(pid)]
    assert left == []


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# ---------------------------------------------------------------- what the program can read

ROOT_ALLOWED = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc",
                "tmp"}
DEV_ALLOWED = {"null", "zero", "full", "random", "urandom", "fd", "stdin", "stdout", "stderr",
               "shm"}
ETC_ALLOWED = {"passwd", "group", "ld.so.cache", "ld.so.preload", "localtime"}


def _world_readable_dir(parent: str, prefix: str) -> Path:
    """A new directory anyone may read under `parent` (created as root); skips if it cannot."""
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError:
        pytest.skip(f"cannot create a directory under {parent}")
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def problem_files():
    """The run's own problem file (its test cases, expected outputs included), world-readable
    (644) in directories anyone may enter: a data directory under /srv, a user's home under
    /home, and one in $HOME (readable by the sandbox only where $HOME is)."""
    name = f"problem_{uuid.uuid4().hex}.jsonl"
    made = []
    try:
        for parent in ("/srv", "/home", str(Path.home())):
            made.append(_world_readable_dir(parent, "kimi_rl_sandbox_data_"))
            (made[-1] / name).write_text(json.dumps({"id": "add", "tests": ADD}) + "\n")
            os.chmod(made[-1] / name, 0o644)
        yield name, [str(d / name) for d in made]
    finally:
        for d in made:
            shutil.rmtree(d)


def test_the_problem_file_cannot_be_found_or_read(problem_files):
    name, paths = problem_files
    # a reward hack: read the test cases and print the expected output for this input
    hack = f"""
        import json, sys
        stdin = sys.stdin.read()
        for path in {paths!r}:
            try:
                tests = json.load(open(path))["tests"]
            except OSError:
                continue
            print(next(t["output"] for t in tests if t["input"] == stdin))
            break
    """
    assert score(hack) == 0.0
    search = f"""
        import os
        for path in {paths!r}:
            try:
                print("read", path, len(open(path).read()), flush=True)
            except OSError:
                pass
        for top, dirs, files in os.walk("/"):
            if top == "/":
                dirs[:] = [d for d in dirs if d not in ("proc", "sys")]
            if {name!r} in files:
                print("found", top, flush=True)
        print("searched")
    """
    run = run_python(textwrap.dedent(search), limits=replace(FAST, time_s=30.0))
    assert (run.status, run.stdout) == ("ok", b"searched\n"), (run.stdout[-2000:], run.stderr)


def test_the_root_is_minimal():
    repo = str(Path(__file__).resolve().parents[1])
    run = run_python(textwrap.dedent(f"""
        import json, os
        print(json.dumps([os.listdir(d) for d in ("/", "/dev", "/etc")]))
        print(os.path.exists({repo!r}), os.path.exists("/etc/hostname"))
    """), limits=FAST)
    assert run.status == "ok", run.stderr
    lines = run.stdout.decode().splitlines()
    root, dev, etc = (set(names) for names in json.loads(lines[0]))
    assert root <= ROOT_ALLOWED and {"usr", "tmp", "dev", "proc", "etc"} <= root, root
    assert not root & {"home", "root", "srv", "opt", "mnt", "work", "var", "run", "sys"}
    assert dev <= DEV_ALLOWED and {"null", "urandom", "shm"} <= dev, dev
    assert etc <= ETC_ALLOWED, etc
    assert lines[1] == "False False"  # the checkout, and /etc beyond the few files


def test_standard_library_programs_still_run():
    program = textwrap.dedent("""
        import collections, hashlib, json, math, os, pwd, random, re, sqlite3, subprocess
        import sys, tempfile, time
        a, b = map(int, re.findall(r"-?\\d+", sys.stdin.read()))
        child = subprocess.run([sys.executable, "-c", "import json; print(json.dumps(1))"],
                               capture_output=True, text=True, check=True)
        db = sqlite3.connect(":memory:")
        db.execute("create table t (x)")
        db.executemany("insert into t values (?)", [(a,), (b,)])
        with tempfile.NamedTemporaryFile("w") as f, open(os.devnull, "w") as null:
            f.write("x")
            null.write("x")
        checks = [collections.Counter("aab")["a"] == 2, math.isqrt(16) == 4,
                  len(hashlib.sha256(os.urandom(8)).hexdigest()) == 64,
                  json.loads(child.stdout) == 1, time.localtime().tm_year > 2000,
                  pwd.getpwuid(os.getuid()).pw_dir == os.environ["HOME"],
                  0 <= random.random() < 1]
        print(db.execute("select sum(x) from t").fetchone()[0] if all(checks) else checks)
    """)
    assert score(program) == 1.0
    run = run_python(program, b"1 2", limits=FAST)
    assert (run.status, run.stdout) == ("ok", b"3\n"), run.stderr


def test_extra_dirs_are_readable_and_nothing_beside_them(tmp_path):
    base = _world_readable_dir("/var/lib", "kimi_rl_sandbox_test_")
    try:
        pkg, data = base / "pkg", base / "data"
        for d in (pkg, data):
            d.mkdir(mode=0o755)
        (pkg / "kimi_rl_helper.py").write_text("VALUE = 41\n")
        (data / "answers.json").write_text("{}")
        program = textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {str(pkg)!r})
            import kimi_rl_helper
            print(kimi_rl_helper.VALUE + 1, os.listdir({str(base)!r}))
            print(os.path.exists({str(data / "answers.json")!r}))
            try:
                open({str(pkg / "new.py")!r}, "w")
                print("written")
            except OSError:
                print("read-only")
        """)
        run = run_python(program, limits=replace(FAST, extra_dirs=[str(pkg)]))
        assert run.status == "ok" and run.stdout == b"42 ['pkg']\nFalse\nread-only\n", run
        assert run_python(program, limits=FAST).status == "error"  # not without it
        reward = OmegaConf.structured(RewardConfig(sandbox_extra_dirs=[str(pkg)]))
        assert get_verifier("code", reward).limits.extra_dirs == (str(pkg),)
    finally:
        shutil.rmtree(base)
    with pytest.raises(ValueError, match="reward.sandbox_extra_dirs: '/no/such/dir'"):
        get_verifier("code", RewardConfig(sandbox_extra_dirs=["/no/such/dir"]))
    with pytest.raises(ValueError, match="extra_dirs: 'pkg'"):
        Limits(extra_dirs=["pkg"])  # relative
    hidden = re.escape(str(tmp_path))  # by the run's own /tmp
    with pytest.raises(SandboxError, match=hidden):
        run_python("pass", limits=replace(FAST, extra_dirs=[str(tmp_path)]))


def test_an_interpreter_outside_the_system_directories():
    # a virtualenv elsewhere: its prefix is shown, not the directory around it
    base = _world_readable_dir("/var/lib", "kimi_rl_sandbox_test_")
    try:
        venv = base / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)],
                       check=True, capture_output=True)
        site = subprocess.run([str(venv / "bin" / "python3"), "-c",
                               "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "kimi_rl_venv_only.py").write_text("HERE = 'venv'\n")
        (base / "beside.txt").write_text("not for the program")
        os.chmod(base / "beside.txt", 0o644)
        run = run_python(textwrap.dedent(f"""
            import os, sys, kimi_rl_venv_only
            print(sys.prefix, kimi_rl_venv_only.HERE, os.listdir({str(base)!r}))
        """), limits=FAST, python=str(venv / "bin" / "python3"))
        assert (run.status, run.stdout.decode()) == ("ok", f"{venv} venv ['venv']\n"), run
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------- parallel verification

def test_parallel_batch_equals_sequential_and_bounds_concurrency():
    programs = [ADD_OK, "print(3)", "while True:\n    pass", "syntax error(",
                "import time\ntime.sleep(0.4)\n" + ADD_OK, ADD_OK.replace("+", "*")]
    problems = [problem(pid=f"p{i}") for i in range(len(programs))]
    responses = [fenced(p) for p in programs]
    one = CodeVerifier(FAST, workers=1)
    sequential = [one(p, r) for p, r in zip(problems, responses, strict=True)]
    assert sequential == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    running, peak, lock = [0], [0], threading.Lock()

    class Counting(CodeVerifier):
        def run_test(self, program, case, where):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            try:
                return super().run_test(program, case, where)
            finally:
                with lock:
                    running[0] -= 1

    assert Counting(FAST, workers=2).batch(problems, responses) == sequential
    assert peak[0] == 2


def test_score_groups_uses_the_batch_verifier():
    calls = []

    class Recording(CodeVerifier):
        def batch(self, problems, responses):
            calls.append(len(problems))
            return super().batch(problems, responses)

    samples = [Sample(problem(pid=f"g{g}"), g, [], [1] * (3 + j), [], "stop",
                      fenced(ADD_OK if j == 0 else "print(0)"))
               for g in range(2) for j in range(2)]
    score_groups(samples, Recording(FAST, workers=2), length_weight=0.0)
    assert calls == [4]
    assert [s.correct for s in samples] == [1.0, 0.0, 1.0, 0.0]
    assert [s.reward for s in samples] == [1.0, 0.0, 1.0, 0.0]
