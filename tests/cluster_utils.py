"""Throw-away local Ray clusters (``ray start`` head + optional workers) for tests.

Usage::

    from cluster_utils import local_ray_cluster

    with local_ray_cluster(num_nodes=2, resources_per_node=[{"node_a": 1}, {"node_b": 1}]) as c:
        status, logs = c.submit("python jobs/train.py --data ... --storage-path /tmp/...",
                                working_dir=REPO_ROOT, timeout=300)
        assert status == "SUCCEEDED", logs

Every node is a ``ray start --block`` subprocess in its own session/process group,
with its own ``--temp-dir`` under a short ``/tmp/koa-XXXXXX`` root (Ray puts unix
sockets there; the path length limit is ~107 bytes) and its own free ports.
Teardown never calls ``ray stop``: on Ray 2.60 ``ray stop`` takes no address or
temp-dir and terminates *every* raylet / gcs_server / dashboard on the machine
(it matches processes by name), which would also kill the in-process
``ray.init()`` cluster other tests use.  Instead teardown sends SIGTERM to each
``ray start --block`` process (its handler shuts down the node's own children),
then SIGKILLs the node's process group and any descendant that survived.

Token authentication (Ray >= 2.52): with ``token=True`` every node runs with
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH=<root>/auth_token`` (a fresh
``secrets.token_hex(32)`` token; ~/.ray/auth_token is never read or written).
Clients need *both* ``RAY_AUTH_MODE=token`` and the token (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ~/.ray/auth_token) -- :attr:`LocalRayCluster.env`
has them; :attr:`LocalRayCluster.env_without_token` is a client env that has
none (``RAY_AUTH_*`` removed and ``HOME`` pointed at an empty dir so a stray
~/.ray/auth_token cannot be picked up).  Both set ``RAY_API_SERVER_ADDRESS`` to the
dashboard URL and never ``RAY_ADDRESS``: in Ray 2.60 the Jobs client lets
``RAY_ADDRESS`` override even an explicit ``--address http://...``.
:meth:`LocalRayCluster.run_driver` adds ``RAY_ADDRESS=<gcs>`` for ``ray.init()``.
Both also put this interpreter's bin dir first on PATH, so ``python`` in job
entrypoints is the venv's Python even if pytest was not run from an activated venv.

Only the stdlib is used here (no psutil, no ``import ray``) so importing this
module never touches Ray state in the pytest process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

__all__ = [
    "ClusterStartError",
    "LocalRayCluster",
    "RayNode",
    "free_ports",
    "local_ray_cluster",
    "ray_executable",
]

# Environment variables that must not leak from the pytest process (which may
# itself have run ray.init(), which sets RAY_AUTH_MODE=token in os.environ on
# Ray 2.60) into the nodes or the clients we start.
_STRIPPED_ENV_PREFIXES = ("RAY_AUTH_",)
_STRIPPED_ENV_VARS = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_JOB_ID",
    "RAY_RAYLET_PID",
    "RAY_NODE_ID",
    "RAY_RUNTIME_ENV_HOOK",
)

_RESULT_MARKER = "KOA_SUBMIT_RESULT="

_SUBMIT_SCRIPT = r"""
import json, sys, time
from ray.job_submission import JobSubmissionClient

a = json.loads(sys.argv[1])
client = JobSubmissionClient(a["address"])
kwargs = {k: a[k] for k in ("runtime_env", "submission_id", "entrypoint_num_cpus",
                            "entrypoint_num_gpus", "entrypoint_resources", "metadata")
          if a.get(k) is not None}
sid = client.submit_job(entrypoint=a["entrypoint"], **kwargs)
deadline = time.monotonic() + a["timeout"]
status = None
while True:
    status = client.get_job_status(sid)
    if status.is_terminal():
        status = status.value
        break
    if time.monotonic() > deadline:
        try:
            client.stop_job(sid)
        except Exception as exc:  # noqa: BLE001
            print(f"stop_job failed: {exc}", file=sys.stderr)
        status = "TIMEOUT"
        break
    time.sleep(0.5)
try:
    logs = client.get_job_logs(sid)
except Exception as exc:  # noqa: BLE001
    logs = f"<could not fetch logs: {exc}>"
print(MARKER + json.dumps({"submission_id": sid, "status": status, "logs": logs}), flush=True)
"""


class ClusterStartError(RuntimeError):
    """A node did not come up; the message carries the tail of its ``ray start`` log."""


def ray_executable() -> str:
    """The ``ray`` CLI next to the running interpreter (the venv's), else from $PATH."""
    candidate = Path(sys.executable).with_name("ray")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if not found:
        raise FileNotFoundError("ray CLI not found next to sys.executable nor on PATH")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on all interfaces right now.

    All sockets are held open until every port is chosen, so the ports are distinct.
    (GCS and raylet bind on all interfaces, hence the wildcard bind.)
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key in _STRIPPED_ENV_VARS or key.startswith(_STRIPPED_ENV_PREFIXES):
            del env[key]
    return env


# --------------------------------------------------------------------------- #
# /proc helpers (Linux) -- psutil is not a dependency of this project
# --------------------------------------------------------------------------- #
def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, pgid, starttime) of ``pid`` or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces/parens: split after the last ')'
    fields = raw[raw.rfind(")") + 2 :].split()
    # fields[0]=state, [1]=ppid, [2]=pgrp, ..., [19]=starttime
    return int(fields[1]), int(fields[2]), fields[19]


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _descendants(root_pids: Sequence[int]) -> dict[int, str]:
    """{pid: starttime} of every live descendant of ``root_pids`` (roots excluded)."""
    children: dict[int, list[int]] = {}
    start: dict[int, str] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is None:
            continue
        children.setdefault(st[0], []).append(pid)
        start[pid] = st[2]
    out: dict[int, str] = {}
    stack = list(root_pids)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out[child] = start[child]
                stack.append(child)
    return out


def _same_process_alive(pid: int, starttime: str) -> bool:
    st = _proc_stat(pid)
    if st is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rfind(")") + 2] == "Z":
            return False
    except OSError:
        return False
    return st[2] == starttime


# --------------------------------------------------------------------------- #
# cluster objects
# --------------------------------------------------------------------------- #
@dataclass
class RayNode:
    """One ``ray start --block`` process."""

    index: int
    head: bool
    temp_dir: Path
    log_path: Path
    resources: dict[str, float]
    num_cpus: int
    num_gpus: int
    proc: subprocess.Popen | None = None
    restarts: int = 0
    past_pids: list[int] = field(default_factory=list)
    start_args: list[str] = field(default_factory=list, repr=False)
    _log_file: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"


@dataclass
class LocalRayCluster:
    """Handle to a running local cluster; create it with :func:`local_ray_cluster`."""

    root: Path
    token: str | None
    token_path: Path | None
    node_ip: str
    gcs_port: int
    dashboard_port: int
    nodes: list[RayNode]
    env: dict[str, str]
    env_without_token: dict[str, str]
    cwd: Path | None = None
    _stopped: bool = False

    # ---- addresses --------------------------------------------------------
    @property
    def address(self) -> str:
        """Dashboard / Jobs API URL, e.g. ``http://127.0.0.1:38265``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """GCS address for ``ray.init(address=...)`` / ``ray start --address``."""
        return f"{self.node_ip}:{self.gcs_port}"

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    # ---- clients ----------------------------------------------------------
    def _client_env(self, with_token: bool, extra_env: Mapping[str, str] | None) -> dict[str, str]:
        env = dict(self.env if with_token else self.env_without_token)
        if extra_env:
            env.update(extra_env)
        return env

    def http_get(self, path: str, with_token: bool = True, timeout: float = 10) -> tuple[int, str]:
        """GET ``path`` on the dashboard; returns (HTTP status, body). Never raises on 4xx/5xx."""
        req = urllib.request.Request(self.address + path)
        if with_token and self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def ray_cli(
        self,
        *args: str,
        with_token: bool = True,
        timeout: float = 120,
        cwd: str | os.PathLike | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``ray <args>`` as a client of this cluster (captured text output, no check)."""
        return subprocess.run(
            [ray_executable(), *args],
            env=self._client_env(with_token, extra_env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_driver(
        self,
        code: str,
        with_token: bool = True,
        timeout: float = 120,
        cwd: str | os.PathLike | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``python -c code`` with RAY_ADDRESS=<gcs> so ``ray.init()`` joins this cluster."""
        env = self._client_env(with_token, extra_env)
        env.setdefault("RAY_ADDRESS", self.gcs_address)
        return subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(
        self,
        entrypoint: str,
        working_dir: str | os.PathLike | None = None,
        timeout: float = 300,
        *,
        runtime_env: Mapping[str, Any] | None = None,
        submission_id: str | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
        entrypoint_resources: Mapping[str, float] | None = None,
        with_token: bool = True,
        extra_env: Mapping[str, str] | None = None,
    ) -> tuple[str, str]:
        """Submit a Ray job, wait for it, return ``(status, logs)``.

        ``status`` is the terminal JobStatus value (``"SUCCEEDED"``, ``"FAILED"``,
        ``"STOPPED"``) or ``"TIMEOUT"`` if it did not finish within ``timeout``
        seconds (the job is then stopped).  ``working_dir`` (uploaded to the
        cluster; ``.gitignore``d paths such as ``.venv/`` are skipped by Ray) is
        merged into ``runtime_env``.  The client runs in a subprocess with
        :attr:`env`, so the pytest process's own Ray/auth state is untouched.
        Raises ``RuntimeError`` if the submission itself fails (e.g. refused).
        """
        renv = dict(runtime_env or {})
        if working_dir is not None:
            renv["working_dir"] = str(working_dir)
        payload = {
            "address": self.address,
            "entrypoint": entrypoint,
            "timeout": timeout,
            "runtime_env": renv or None,
            "submission_id": submission_id,
            "entrypoint_num_cpus": entrypoint_num_cpus,
            "entrypoint_num_gpus": entrypoint_num_gpus,
            "entrypoint_resources": dict(entrypoint_resources) if entrypoint_resources else None,
        }
        script = f"MARKER = {_RESULT_MARKER!r}\n" + _SUBMIT_SCRIPT
        proc = subprocess.run(
            [sys.executable, "-c", script, json.dumps(payload)],
            env=self._client_env(with_token, extra_env),
            capture_output=True,
            text=True,
            timeout=timeout + 120,
        )
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(_RESULT_MARKER):
                result = json.loads(line[len(_RESULT_MARKER) :])
                logs = result["logs"]
                for extra in self._non_head_driver_logs(result["submission_id"]):
                    if extra.strip() and extra.strip() not in logs:
                        logs += extra
                return result["status"], logs
        raise RuntimeError(
            f"job submission failed (rc={proc.returncode}):\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )

    def _non_head_driver_logs(self, submission_id: str) -> list[str]:
        """Driver logs written on non-head nodes of this single-host cluster.

        When the entrypoint runs on a worker node (``entrypoint_resources``), its output goes
        to that node's ``<temp-dir>/session_*/logs/job-driver-<id>.log``, but the Jobs API
        reads it through the node's agent, which resolves the path against the *head's*
        session dir (Ray assumes the same temp dir on every machine) and so returns only the
        head-side lines (it depends on which node's agent process answers).  All nodes are
        local here, so read those files directly; submit() appends what the API missed.
        """
        return [
            f.read_text(errors="replace")
            for node in self.nodes[1:]
            for f in sorted(node.temp_dir.glob(f"session_*/logs/job-driver-{submission_id}.log"))
        ]

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Nodes the GCS reports ALIVE (dashboard state API; needs the token)."""
        status, body = self.http_get("/api/v0/nodes?limit=100&detail=true")
        if status != 200:
            return []
        data = json.loads(body)
        result = data.get("data", {}).get("result", {})
        rows = result.get("result", []) if isinstance(result, dict) else result
        return [n for n in rows if n.get("state") == "ALIVE"]

    # ---- teardown ---------------------------------------------------------
    def stop(self, grace_s: float = 20) -> None:
        """Stop every node of *this* cluster (never ``ray stop``) and delete the temp root."""
        if self._stopped:
            return
        self._stopped = True
        procs = [n.proc for n in self.nodes if n.proc is not None]
        roots = [p.pid for p in procs if p.poll() is None]
        leftovers = _descendants(roots) if roots else {}
        # start_new_session=True -> pgid == pid (also for attempts that failed and were restarted)
        pgids = {p.pid for p in procs} | {pid for n in self.nodes for pid in n.past_pids}
        # SIGTERM the `ray start --block` processes: their handler kills the
        # node's own processes (raylet, gcs, dashboard, agents, workers).
        for p in reversed(procs):  # workers first, head last
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Anything left in our process groups or among the descendants: SIGKILL.
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for pid, start in leftovers.items():
            if _same_process_alive(pid, start):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for n in self.nodes:
            if n._log_file is not None:
                n._log_file.close()
        # Give killed processes a moment to release files, then remove the root.
        for _ in range(10):
            if not any(_same_process_alive(pid, s) for pid, s in leftovers.items()):
                break
            time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """PIDs (other than zombies) still in this cluster's process groups -- [] after stop()."""
        pgids = {n.proc.pid for n in self.nodes if n.proc is not None}
        pgids |= {pid for n in self.nodes for pid in n.past_pids}
        out = []
        for pid in _all_pids():
            st = _proc_stat(pid)
            if st and st[1] in pgids and _same_process_alive(pid, st[2]):
                out.append(pid)
        return out


def _wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _start_node(
    node: RayNode,
    args: list[str],
    env: dict[str, str],
    cwd: str | os.PathLike | None,
) -> None:
    node.temp_dir.mkdir(parents=True, exist_ok=True)
    if node.proc is not None:  # restart after a failed attempt
        node.past_pids.append(node.proc.pid)
        node.restarts += 1
    if node._log_file is not None:
        node._log_file.close()
    node.start_args = list(args)
    node._log_file = open(node.log_path, "ab")  # noqa: SIM115 - closed in stop()
    node.proc = subprocess.Popen(
        [ray_executable(), "start", "--block", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=node._log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own session + process group: killpg() only hits this node
    )


@contextlib.contextmanager
def local_ray_cluster(
    num_nodes: int = 1,
    token: bool = True,
    num_cpus_per_node: int | Sequence[int] = 1,
    resources_per_node: Sequence[Mapping[str, float]] | None = None,
    num_gpus_per_node: int | Sequence[int] = 0,
    object_store_memory: int | None = 256 * 1024**2,
    include_dashboard: bool = True,
    cwd: str | os.PathLike | None = None,
    node_env: Mapping[str, str] | None = None,
    startup_timeout: float = 180,
    max_node_restarts: int = 2,
) -> Iterator[LocalRayCluster]:
    """Start a token-authenticated local Ray cluster, yield a :class:`LocalRayCluster`, tear it down.

    Args:
        num_nodes: 1 = head only; N > 1 adds N-1 worker nodes (``ray start --address``)
            on this machine, each with its own ``--temp-dir``.
        token: enable Ray token auth (``RAY_AUTH_MODE=token``) on every node.  With
            ``False`` nodes run with ``RAY_AUTH_MODE=disabled`` explicitly (otherwise
            ``ray start`` auto-enables auth when ~/.ray/auth_token exists).
        num_cpus_per_node / num_gpus_per_node: int for all nodes or one per node.
        resources_per_node: custom resources, one dict per node, e.g.
            ``[{"node_a": 1}, {"node_b": 1}]`` to pin work to a node.
        object_store_memory: bytes per node (None = Ray's default of 30% of RAM).
        include_dashboard: the head's dashboard (Jobs API) on 127.0.0.1.  Without it
            submit()/http_get()/alive_nodes() don't work and worker nodes are not
            waited for.
        cwd: working directory of the node processes (a job without a
            ``working_dir`` runs its entrypoint there).
        node_env: extra env vars for the node processes.
        startup_timeout: seconds to wait for the head, then for the dashboard and all nodes.
        max_node_restarts: how often a worker node whose ``ray start`` exits during startup
            is restarted (Ray gives a node a fixed 30 s to register, which a loaded CI
            machine can exceed).
    """
    if num_nodes < 1:
        raise ValueError("num_nodes must be >= 1")
    cpus = [num_cpus_per_node] * num_nodes if isinstance(num_cpus_per_node, int) else list(num_cpus_per_node)
    gpus = [num_gpus_per_node] * num_nodes if isinstance(num_gpus_per_node, int) else list(num_gpus_per_node)
    res = [dict(r) for r in resources_per_node] if resources_per_node else [{} for _ in range(num_nodes)]
    if not (len(cpus) == len(gpus) == len(res) == num_nodes):
        raise ValueError("per-node lists must have num_nodes entries")

    # Short root: Ray's unix socket paths live under it (limit ~107 bytes).
    root = Path(tempfile.mkdtemp(prefix="koa-", dir="/tmp"))
    os.chmod(root, 0o700)
    empty_home = root / "client-home"
    empty_home.mkdir()

    base_env = _clean_env()
    # Job entrypoints say `python ...`: make that this interpreter (the venv with Ray), even when
    # pytest was started as .venv/bin/python without activating the venv.
    bin_dir = str(Path(sys.executable).parent)
    base_env["PATH"] = os.pathsep.join([bin_dir, *[p for p in base_env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    base_env["RAY_USAGE_STATS_ENABLED"] = "0"
    # SIGTERM on `ray start --block` otherwise drains the node for up to 30 s first.
    base_env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"

    tok = token_path = None
    if token:
        tok = secrets.token_hex(32)  # same generator as `ray get-auth-token --generate`
        token_path = root / "auth_token"
        token_path.write_text(tok)
        os.chmod(token_path, 0o600)
        auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    else:
        auth_env = {"RAY_AUTH_MODE": "disabled"}

    nodes_env = {**base_env, **auth_env, **(node_env or {})}

    # Clients: with token, and a "stranger" without any token.
    client_env = {**base_env, **auth_env}
    no_token_env = dict(base_env)
    no_token_env["HOME"] = str(empty_home)  # no ~/.ray/auth_token to fall back on

    ports = free_ports(2 + 2 * num_nodes)
    gcs_port, dashboard_port, *per_node = ports
    # State API calls made inside the cluster (Ray Train's placement-group cleaner) go to this cluster's dashboard,
    # not to whichever Ray instance on this machine auto-detection would find first.
    if include_dashboard:
        nodes_env.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dashboard_port}")
    client_server_port = per_node.pop()
    nodes: list[RayNode] = []
    for i in range(num_nodes):
        nodes.append(
            RayNode(
                index=i,
                head=(i == 0),
                temp_dir=root / f"n{i}",
                log_path=root / f"node{i}.log",
                resources=res[i],
                num_cpus=cpus[i],
                num_gpus=gpus[i],
            )
        )
    agent_ports = per_node  # one dashboard-agent HTTP port per node (default 52365 would clash)

    cluster = LocalRayCluster(
        root=root,
        token=tok,
        token_path=token_path,
        node_ip="",
        gcs_port=gcs_port,
        dashboard_port=dashboard_port,
        nodes=nodes,
        env=client_env,
        env_without_token=no_token_env,
        cwd=Path(cwd) if cwd else None,
    )

    def common_args(node: RayNode, agent_port: int) -> list[str]:
        args = [
            "--temp-dir", str(node.temp_dir),
            "--num-cpus", str(node.num_cpus),
            "--num-gpus", str(node.num_gpus),
            "--dashboard-agent-listen-port", str(agent_port),
            "--disable-usage-stats",
        ]
        if node.resources:
            args += ["--resources", json.dumps(node.resources)]
        if object_store_memory:
            args += ["--object-store-memory", str(object_store_memory)]
        return args

    try:
        head = nodes[0]
        head_args = [
            "--head",
            "--node-ip-address", "127.0.0.1",
            "--port", str(gcs_port),
            "--ray-client-server-port", str(client_server_port),
            "--include-dashboard", "true" if include_dashboard else "false",
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port),
            *common_args(head, agent_ports[0]),
        ]
        _start_node(head, head_args, nodes_env, cwd)

        # Ray rewrites --node-ip-address 127.0.0.1 to the host's routable IP and
        # records the GCS address in <temp-dir>/ray_current_cluster.
        addr_file = head.temp_dir / "ray_current_cluster"

        def head_ready() -> bool:
            # The address file is written once the GCS is up; worker nodes can
            # join from then on while the dashboard is still starting.
            if head.proc.poll() is not None:
                raise ClusterStartError(f"head exited rc={head.proc.returncode}:\n{head.log_tail()}")
            return addr_file.exists() and bool(addr_file.read_text().strip())

        try:
            _wait_until(head_ready, startup_timeout, what="head node")
        except TimeoutError as err:
            raise ClusterStartError(f"{err}\n{head.log_tail()}") from None
        gcs_address = addr_file.read_text().strip()
        cluster.node_ip = gcs_address.rsplit(":", 1)[0]
        # Jobs CLI/SDK: RAY_API_SERVER_ADDRESS wins over --address/RAY_ADDRESS in Ray 2.60
        # (RAY_ADDRESS, if set, would even override an explicit --address http://...).
        cluster.env["RAY_API_SERVER_ADDRESS"] = cluster.address
        cluster.env_without_token["RAY_API_SERVER_ADDRESS"] = cluster.address

        for node in nodes[1:]:
            _start_node(
                node,
                ["--address", gcs_address, *common_args(node, agent_ports[node.index])],
                nodes_env,
                cwd,
            )

        if include_dashboard:

            def all_alive() -> bool:
                for n in nodes:
                    if n.proc.poll() is not None:
                        # On an overloaded machine a worker's `ray start` can hit Ray's fixed
                        # 30 s "node timed out during startup"; retry it a couple of times.
                        if n.head or n.restarts >= max_node_restarts:
                            raise ClusterStartError(
                                f"node {n.index} exited rc={n.proc.returncode}:\n{n.log_tail()}"
                            )
                        _start_node(n, n.start_args, nodes_env, cwd)
                try:
                    if len(cluster.alive_nodes()) < num_nodes:
                        return False
                except OSError:  # dashboard not listening yet
                    return False
                # Jobs API routes are served once the job module is up.
                return cluster.http_get("/api/jobs/")[0] == 200

            try:
                _wait_until(all_alive, startup_timeout, interval=0.5, what=f"{num_nodes} ALIVE node(s)")
            except TimeoutError as err:
                tails = "\n".join(f"--- node {n.index} ---\n{n.log_tail()}" for n in nodes)
                raise ClusterStartError(f"{err}\n{tails}") from None
        yield cluster
    finally:
        cluster.stop()
