"""Shared test parts: generated audio, generated checkpoints, real servers on loopback."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from emotion.engine.audio import encode_audio as encode  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
SR = 16_000


def speech_like(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-shaped signal: a gliding pitch with harmonics, an envelope, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    return (0.3 * voiced * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def loaded(settings, **hooks):
    """An engine with emotion2vec in this process, loaded here in this thread."""
    from emotion.engine.core import EmotionEngine

    engine = EmotionEngine(settings, **hooks)
    engine.backend.load()
    return engine


def wav_bytes(seconds: float = 2.0, sr: int = SR, seed: int = 0) -> bytes:
    return encode(speech_like(seconds, sr, seed), sr, "WAV", "PCM_16")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (Sanic serves from a worker process)."""
    pids, total = [pid], 0.0
    while pids:
        p = pids.pop()
        try:
            pids += [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ESTABLISHED, TIME_WAIT = "01", "06"  # kernel codes of TCP states (a closed socket waits a minute)


def sockets_to(port: int) -> list[str]:
    """The TCP states of this host's sockets connected to ``port`` (client ends only)."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            remote, state = line.split()[2:4]
            if int(remote.rsplit(":", 1)[1], 16) == port:
                states.append(state)
    return states


# In Rasa Pro's environment, keep its libraries off the network: LiteLLM would fetch a
# price list on import, telemetry would phone home.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("RASA_TELEMETRY_ENABLED", "false")
# The onnx runtime's exports (EMOTION_RUNTIME=auto on CPU where the onnx extra is installed),
# kept between runs: they are named by the checkpoints' contents, so a stale one is never used.
os.environ.setdefault("EMOTION_ONNX_CACHE_DIR", str(ROOT / ".pytest_cache" / "onnx"))
try:  # the Rasa Pro tests run in Rasa Pro's own environment (scripts/test.sh)
    import rasa.dialogue_understanding  # noqa: F401
except ImportError:
    collect_ignore = ["rasa_pro"]

_MODEL_FIXTURES = {"models", "tiny_model", "serve", "server", "server_newest", "server_sdk36", "server_int8", "locked_server", "broken_server",
                   "alert_server", "bot", "engine", "browser", "angry90", "pro_action_server"}


def pytest_configure(config):
    config.addinivalue_line("markers", "onnx: about the onnx runtime: EMOTION_RUNTIME=auto is not pinned to torch")


def pytest_collection_modifyitems(items):
    # The torch-free parts (audio, sources, batching, rules, config) also run on Python
    # 3.10 without torch: `-m "not model"` leaves out every test that loads a model.
    for item in items:
        if _MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
    # Modules that need no session server run first, while the servers boot; a module stays
    # whole so its module-scoped fixtures are made once.
    late = {item.module for item in items if _session_servers(getattr(item, "fixturenames", ()))}
    items.sort(key=lambda item: item.module in late)


@pytest.fixture(autouse=True)
def _auto_runtime_is_torch(request, monkeypatch):
    """``EMOTION_RUNTIME=auto`` is ONNX Runtime on a CPU where the onnx extra is installed, and
    exporting a checkpoint costs about 20 s of CPU: tests run FunASR's forward unless they name
    the onnx runtime, or are about it (marked ``onnx``). The session servers say which they run."""
    if request.node.get_closest_marker("onnx") is None:
        try:
            from emotion.engine import model
        except ImportError:  # no torch (the Python 3.10 run): no model either
            return
        resolve = model.resolve_runtime
        monkeypatch.setattr(model, "resolve_runtime", lambda runtime, *args: resolve("torch" if runtime == "auto" else runtime, *args))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Checkpoint directories by name, made once per session."""
    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def get(name: str = "random", **head: float) -> Path:
        from emotion.tools.checkpoint import write_checkpoint  # torch: only tests that need a model

        if name not in made:
            made[name] = write_checkpoint(root / name, size="tiny", head_probs=head or None, seed=len(made))
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_model(models) -> Path:
    return models("random")


class ActionServer:
    """The real rasa-sdk action server with our actions package, in its own process."""

    def __init__(self, env: dict[str, str], port: int | None = None, python: str = sys.executable) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env, self.python = env, python
        self.ready = False
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "SANIC_HOST": "127.0.0.1", **env}
        self.log = open(Path(env.get("_LOG_DIR", "/tmp")) / f"action-server-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [python, "-m", "rasa_sdk", "--actions", "actions", "--port", str(self.port)],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
            # Sanic kills a failed worker's whole process group: keep the tests out of it.
            start_new_session=True,
        )

    def wait(self, ready: bool = True, timeout_s: float = 120.0) -> ActionServer:
        """Until /ready answers (the model loaded, or failed to), or with ready=False /health."""
        if ready and self.ready:
            return self
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"action server exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                r = httpx.get(self.url + ("/ready" if ready else "/health"), timeout=2)
                if r.status_code == 200 or (not ready and r.status_code == 503) or (ready and r.json().get("error")):
                    self.ready = ready
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"action server not ready after {timeout_s} s; log: {self.log.name}")

    def restart(self) -> None:
        """Stops this server and starts it again on its port, as a deploy does."""
        self.stop()
        self.__init__(self.env, self.port, self.python)
        self.wait()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# One real action server per environment and checkpoint, shared by the whole session;
# each is its own process, spoken to over HTTP as Rasa speaks to it. "sdk-3.6" is rasa-sdk
# 3.6.2 on Sanic 21.12, what Rasa Open Source 3.6 and its rasa-sdk image run.
SDK_PYTHONS = {"newest": sys.executable, "sdk-3.6": str(ROOT / ".venv-sdk36" / "bin" / "python")}
PYTHON310 = str(ROOT / ".venv310" / "bin" / "python")  # rasa-sdk 3.6.2 on Python 3.10, without torch
ALERT_RULES = ("rules:\n  - name: angry_caller\n    emotions: [angry]\n    min_confidence: 0.7\n"
               "  - name: watch\n    emotions: [angry]\n    min_confidence: 0.5\n    action: alert\n")
TOKEN = "s3cret"
RESULT_KEY = "test-result-key-not-a-real-secret"  # EMOTION_RESULT_KEY of locked_server


PRESTARTED = ("rasa_training",)  # with the servers: Rasa Open Source trains the example bot meanwhile
# In this order: those that export no ONNX model first, booting while this process exports
# for the others (see serve).
SESSION_SERVERS = ("server_sdk36", "broken_server", "broken_workers_server", "server_py310", "locked_server", "alert_server",
                   "workers_server", "server_newest", "server_int8")
WORKERS = {"ACTION_SERVER_SANIC_WORKERS": "2"}  # two Sanic workers share an engine process


def _session_servers(names) -> set[str]:
    wanted = set(names) & set(PRESTARTED + SESSION_SERVERS + ("server",))
    if "server" in wanted:
        wanted |= {"server_newest", "server_sdk36"}
    return wanted - {"server"}


@pytest.fixture(scope="session", autouse=True)
def _servers_up(request):
    """Starts every session server the selected tests use, all at once, and waits for none:
    the tests that need no server run first (see pytest_collection_modifyitems) while these
    boot, and each test waits for the servers it uses."""
    wanted = _session_servers(name for item in request.session.items for name in getattr(item, "fixturenames", ()))
    for name in PRESTARTED + SESSION_SERVERS:
        if name in wanted:
            request.getfixturevalue(name)


@pytest.fixture(autouse=True)
def _servers_ready(request):
    for name in _session_servers(request.fixturenames):
        request.getfixturevalue(name).wait()


@pytest.fixture(scope="session")
def serve(tmp_path_factory):
    """Starts action servers that stop when the session ends; _servers_up waits for them."""
    servers = []
    logs = tmp_path_factory.mktemp("logs")

    def start(env: dict[str, str], sdk: str = "newest") -> ActionServer:
        python = SDK_PYTHONS.get(sdk, sdk)
        if not Path(python).exists():
            pytest.fail(f"{python} is missing: scripts/setup.sh --test makes it")
        env = {"EMOTION_RUNTIME": "torch", **env}
        if env["EMOTION_RUNTIME"] == "onnx":
            _export_for(Path(env["EMOTION_MODEL"]))
        server = ActionServer({"_LOG_DIR": str(logs), **env}, python=python)
        servers.append(server)
        return server

    yield start
    for server in servers:  # all asked to stop first: each takes a while to wind down
        server.proc.terminate()
    for server in servers:
        server.stop()


def _export_for(model_dir: Path) -> None:
    """A server on CPU exports its checkpoint to ONNX as it loads: made here first, once per
    checkpoint, rather than by several servers at once while their start is timed."""
    import torch

    from emotion.engine import onnx
    from emotion.engine.loading import build_automodel
    from emotion.errors import ModelUnavailable

    with contextlib.suppress(ModelUnavailable):  # a broken checkpoint: its server says so itself
        auto = build_automodel(str(model_dir), "ms", torch.device("cpu"))
        path = onnx.cache_paths(auto, Path(os.environ["EMOTION_ONNX_CACHE_DIR"]))["float32"]
        if not path.is_file():  # here, not in a process of its own as a server does: seconds sooner
            onnx.export_onnx(str(model_dir), path)


def _angry_env(models, audio_root, alerts) -> dict[str, str]:
    """What most tests need: every clip scores angry 0.9; the default rules (angry >= 0.7),
    each escalation also alerting ``angry_alerts``."""
    return {"EMOTION_MODEL": str(models("angry90", angry=0.9)), "EMOTION_AUDIO_ROOT": str(audio_root),
            "EMOTION_URL_ALLOW": "127.0.0.1", "EMOTION_MAX_AUDIO_BYTES": str(2 * 1024 * 1024),
            "EMOTION_ALERT_URL": alerts.url + "/alerts"}


@pytest.fixture(scope="session")
def angry_alerts():
    """The supervisors' endpoint of the angry-0.9 servers: takes every alert, keeps them in ``posted``."""
    receiver = LocalHTTPServer()
    receiver.routes["/alerts"] = (200, {}, b"{}")
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def server_newest(serve, models, audio_root, angry_alerts):
    """On ONNX Runtime in fp32 (the CPU default where it is installed); server_sdk36 runs torch."""
    return serve({**_angry_env(models, audio_root, angry_alerts), "EMOTION_RUNTIME": "onnx"})


@pytest.fixture(scope="session")
def server_int8(serve, models, audio_root, angry_alerts):
    """On ONNX Runtime with int8 weights."""
    return serve({**_angry_env(models, audio_root, angry_alerts), "EMOTION_RUNTIME": "onnx", "EMOTION_DTYPE": "int8"})


@pytest.fixture(scope="session")
def server_sdk36(serve, models, audio_root, angry_alerts):
    return serve(_angry_env(models, audio_root, angry_alerts), sdk="sdk-3.6")


@pytest.fixture(scope="session", params=list(SDK_PYTHONS))
def server(request):
    """The angry-0.9 action server, once on each rasa-sdk the project supports."""
    return request.getfixturevalue("server_newest" if request.param == "newest" else "server_sdk36").wait()


@pytest.fixture(scope="session")
def locked_server(serve, models):
    """Behind a token, with /metrics off, a 3 s turn limit and 1 MiB of uploads at once; results
    signed, and only signed ones taken from metadata.emotion."""
    return serve({"EMOTION_MODEL": str(models("angry90", angry=0.9)), "EMOTION_API_TOKEN": TOKEN, "EMOTION_METRICS": "false",
                  "EMOTION_TURN_TIMEOUT_S": "3", "EMOTION_MAX_UPLOAD_BYTES_IN_FLIGHT": str(1024 * 1024),
                  "EMOTION_RESULT_KEY": RESULT_KEY})


@pytest.fixture(scope="session")
def broken_server(serve, tmp_path_factory):
    """A server whose model directory does not exist: it serves, and says why it cannot tag."""
    return serve({"EMOTION_MODEL": str(tmp_path_factory.mktemp("empty") / "no-model-here")})


@pytest.fixture(scope="session")
def workers_server(serve, models, audio_root, angry_alerts):
    """The angry-0.9 server with two Sanic workers and the model in an engine process."""
    return serve({**_angry_env(models, audio_root, angry_alerts), **WORKERS})


@pytest.fixture(scope="session")
def broken_workers_server(serve, tmp_path_factory):
    return serve({"EMOTION_MODEL": str(tmp_path_factory.mktemp("empty") / "no-model-here"), **WORKERS})


@pytest.fixture(scope="session")
def server_py310(serve, models):
    """rasa-sdk 3.6.2 on Python 3.10, as the rasa/rasa-sdk:3.6.2 image runs it, with no torch
    there: it serves, and tags turns that arrive with their result."""
    return serve({"EMOTION_MODEL": str(models("angry90", angry=0.9))}, sdk=PYTHON310)


@pytest.fixture(scope="session")
def alert_receiver():
    receiver = LocalHTTPServer()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def alert_server(serve, models, alert_receiver, tmp_path_factory):
    """Every clip scores angry 0.6: an alert-only rule fires, to a real loopback receiver."""
    rules = tmp_path_factory.mktemp("rules") / "rules.yml"
    rules.write_text(ALERT_RULES)
    return serve({"EMOTION_MODEL": str(models("angry60", angry=0.6)), "EMOTION_RULES": str(rules),
                  "EMOTION_ALERT_URL": alert_receiver.url + "/alerts", "EMOTION_ALERT_TIMEOUT_S": "0.5",
                  "EMOTION_ALERT_RETRIES": "2"})


# The Rasa Pro tests (tests/rasa_pro) run in Rasa Pro's environment; the action server beside
# Rasa Pro runs where the project's own does, in the main environment.
MAIN_PYTHON = os.environ.get("MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))


@pytest.fixture(scope="session")
def angry90(models, tmp_path_factory) -> Path:
    """A checkpoint that scores every clip angry 0.9: made in this process where torch is,
    else by the main environment."""
    try:
        import torch  # noqa: F401
    except ImportError:
        path = tmp_path_factory.mktemp("models") / "angry90"
        subprocess.run([MAIN_PYTHON, "-m", "emotion", "make-checkpoint", str(path), "--head", "angry=0.9"], cwd=ROOT, check=True,
                       capture_output=True)
        return path
    return models("angry90", angry=0.9)


@pytest.fixture(scope="session")
def pro_action_server(angry90, audio_root, tmp_path_factory):
    """The action server beside Rasa Pro (angry 0.9; path references under ``audio_root``,
    URLs on loopback), shared by every Rasa Pro test module. Started, not waited for: it boots
    while a test trains its assistant; ``.wait()`` before speaking to it."""
    server = ActionServer({"EMOTION_MODEL": str(angry90), "EMOTION_AUDIO_ROOT": str(audio_root), "EMOTION_URL_ALLOW": "127.0.0.1",
                           "_LOG_DIR": str(tmp_path_factory.mktemp("logs"))}, python=MAIN_PYTHON)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def audio_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio_root")
    (root / "turn.wav").write_bytes(wav_bytes(2.0))
    return root


RASA_VENV = Path(os.environ.get("RASA_VENV", ROOT / ".rasa-venv"))
EXAMPLE_BOT = ROOT / "examples" / "bot"


def rasa_bin() -> Path:
    path = RASA_VENV / "bin" / "rasa"
    if not path.exists():
        pytest.fail(f"Rasa Open Source is not installed at {RASA_VENV}: run scripts/install-rasa-oss.sh {RASA_VENV}")
    return path


class RasaTraining:
    """`rasa train` of a copy of the example bot, in Rasa Open Source 3.6's own environment."""

    def __init__(self, work: Path) -> None:
        self.bot = work / "bot"
        shutil.copytree(EXAMPLE_BOT, self.bot, symlinks=False)
        self.log = open(work / "train.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([str(rasa_bin()), "train", "--domain", "domain", "--out", "models", "--fixed-model-name", "bot"],
                                     cwd=self.bot, env={**os.environ, "RASA_TELEMETRY_ENABLED": "false"}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> Path:
        if self.proc.wait(600) != 0:
            pytest.fail(f"rasa train failed; see {self.log.name}")
        return self.bot


@pytest.fixture(scope="session")
def rasa_training(tmp_path_factory):
    training = RasaTraining(tmp_path_factory.mktemp("rasa"))
    yield training
    training.proc.kill()
    training.proc.wait()
    training.log.close()


class Door:
    """A TCP door on loopback to another port, that a test shuts (connections are refused, as
    with the server down) and opens again, without restarting what is behind it."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.open()

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def shut(self) -> None:
        self._listener.close()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # shut
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            pipes = [threading.Thread(target=self._pipe, args=pair, daemon=True) for pair in ((client, upstream), (upstream, client))]
            for pipe in pipes:
                pipe.start()
            threading.Thread(target=self._close_after, args=(pipes, client, upstream), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    @staticmethod
    def _close_after(pipes, *sockets) -> None:
        for pipe in pipes:
            pipe.join()
        for sock in sockets:
            sock.close()


def run_server_to_exit(env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    """An action server that must refuse to start: its exit code and output."""
    return subprocess.run([sys.executable, "-m", "rasa_sdk", "--actions", "actions", "--port", str(free_port())],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "SANIC_HOST": "127.0.0.1", **env},
                          capture_output=True, text=True, timeout=timeout_s, start_new_session=True)


def rasa_call(sender: str, metadata: dict | None, text: str = "hello", slots: dict | None = None,
              action: str = "action_analyze_emotion") -> dict:
    """The JSON body Rasa 3.6 posts to the action server's /webhook."""
    message = {
        "text": text,
        "intent": {"name": "greet", "confidence": 0.99},
        "entities": [],
        "message_id": "m1",
        "metadata": metadata or {},
    }
    return {
        "next_action": action,
        "sender_id": sender,
        "tracker": {
            "sender_id": sender,
            "slots": {"emotion_history": None, "escalate": False, **(slots or {})},
            "latest_message": message,
            "latest_event_time": time.time(),
            "followup_action": None,
            "paused": False,
            "events": [
                {"event": "action", "name": "action_listen", "timestamp": time.time()},
                {"event": "user", "text": text, "parse_data": message, "metadata": metadata or {}, "timestamp": time.time()},
            ],
            "latest_input_channel": "rest",
            "active_loop": {},
            "latest_action": {"action_name": "action_listen"},
            "latest_action_name": "action_listen",
        },
        "domain": {"version": "3.1", "slots": {}, "responses": {"utter_handoff": [{"text": "handing off"}]}, "actions": []},
        "version": "3.6.21",
    }


def slot_events(body: dict) -> dict:
    return {e["name"]: e["value"] for e in body["events"] if e["event"] == "slot"}


class LocalHTTPServer:
    """A real HTTP server on 127.0.0.1 with scripted routes: path -> (status, headers, body)."""

    def __init__(self, keep_alive: bool = False) -> None:
        self.routes: dict[str, tuple] = {}
        self.requests: list[dict] = []
        self.posted: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                outer.posted.append({"path": self.path, "body": self.rfile.read(length), "time": time.monotonic()})
                self.do_GET(record=False)

            def do_GET(self, record=True):  # noqa: N802
                if record:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "client": self.client_address})
                status, headers, body = outer.routes.get(self.path.split("?")[0], (404, {}, b"not found"))
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    if callable(body):
                        self.end_headers()
                        body(self.wfile)
                        return
                    if "Content-Length" not in headers:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_server():
    server = LocalHTTPServer()
    yield server
    server.close()
