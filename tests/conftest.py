"""Shared fixtures: real engines (the offline Piper voice and CosyVoice with a tiny random model), Flask apps around
them, and a real gunicorn on 127.0.0.1 started and stopped by the tests (bounded waits everywhere)."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # test tooling shared with the scripts: parity, random_model
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gated_engine import GatedEngine  # noqa: E402,F401  (re-exported to the test modules)

# The audio cache would answer a repeated text without the engine: tests that compare two syntheses or count the
# engine's work must not depend on what earlier tests left in it. Cache tests turn it on with a directory of
# their own; nothing is ever written to ~/.cache (gunicorn servers inherit this environment).
os.environ["CACHE"] = "off"
os.environ["CACHE_DIR"] = tempfile.mkdtemp(prefix="cosyvoice-lite-tests-")


# ---- programs of the system -----------------------------------------------------------------------------

def require_program(name: str, install: str) -> str:
    """The path of the system program ``name`` (looked up on PATH) for a test that needs it; ``install`` is the
    command that installs it. Missing, the test is skipped with that command as the reason, so that ``./run test``
    passes on a machine with Python alone. Under CI=true it is a failure instead: .ci/run installs every such
    program, and a skip there would hide a broken install step."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"needs {name}: {install}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required under CI=true; .ci/run installs it)", pytrace=False)
    pytest.skip(reason)


# ---- engines ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def piper_engine():
    from cosyvoice_lite.engines.piper import PiperEngine

    engine = PiperEngine(threads=2)
    engine.warmup()
    return engine


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A small random CosyVoice model in the official layout, written by scripts/make_tiny_model.py."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(out)], check=True,
                   capture_output=True, timeout=300)
    assert (out / "cosyvoice.yaml").is_file()
    return out


@pytest.fixture(scope="session")
def cosyvoice_engine(tiny_model_dir):
    from cosyvoice_lite.engines.cosyvoice import CosyVoiceEngine

    engine = CosyVoiceEngine(tiny_model_dir)
    engine.warmup()
    return engine


@pytest.fixture
def gate(tmp_path):
    """A gate directory for GatedEngine, open by default; ``gate.close()`` / ``gate.open()`` / ``gate.mode(m)``."""
    return Gate(tmp_path / "gate")


class Gate:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.open()

    def open(self):
        (self.path / "open").touch()

    def close(self):
        (self.path / "open").unlink(missing_ok=True)

    def mode(self, mode: str):
        (self.path / "mode").write_text(mode)

    def hold(self, mode: str):
        """Close the gate, so that syntheses wait where ``mode`` says (see gated_engine)."""
        self.mode(mode)
        self.close()

    def release(self):
        """No mode and the gate open: nothing waits any more."""
        self.mode("")
        self.open()


def linked_model(root: Path, name: str, model_dir: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """``model_dir`` linked file by file into ``root/name`` (a model's kind shows in its directory's name), without
    the files named in ``leave_out``."""
    out = root / name
    out.mkdir()
    for path in model_dir.iterdir():
        if path.name not in leave_out:
            (out / path.name).symlink_to(path.resolve())
    return out


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory):
    """A base model (CosyVoice-300M's layout): the golden-modes model with its two ONNX networks and no spk2info.pt,
    so no speaker of its own."""
    from golden_data import GOLDEN_MODES

    return linked_model(tmp_path_factory.mktemp("models"), "tiny-base", GOLDEN_MODES / "model",
                        leave_out=("spk2info.pt",))


@pytest.fixture(scope="session")
def base_engine(base_model_dir):
    from cosyvoice_lite.engines.cosyvoice import CosyVoiceEngine

    return CosyVoiceEngine(base_model_dir, mode="fast", backend="torch")


def edit_checkpoint(path: Path, change) -> None:
    """Rewrite a checkpoint file with ``change(state)`` applied to what it holds (a dict)."""
    import torch

    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


# ---- Flask apps ---------------------------------------------------------------------------------------------

@pytest.fixture
def make_app():
    """make_app(engine, **settings) -> a Flask app whose synthesis thread is started and warmed up."""
    from cosyvoice_lite.serve import create_app

    apps = []

    def make(engine, wait=True, **settings):
        app = create_app({"engine": engine, **settings})
        apps.append(app)
        if wait:
            assert app.extensions["cosyvoice_lite"].admission.wait_ready(60), "warm-up did not finish"
        return app

    yield make
    for app in apps:
        app.extensions["cosyvoice_lite"].close()


@pytest.fixture
def piper_app(make_app, piper_engine):
    return make_app(piper_engine)


@pytest.fixture
def client(piper_app):
    return piper_app.test_client()


# ---- a real gunicorn ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc, self.port, self.log_path = proc, port, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 30.0):
        """-> (status, headers dict, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def metrics(self) -> dict:
        """/metrics as {'name{labels}': value}."""
        status, _, body = self.request("GET", "/metrics", timeout=5)
        assert status == 200
        return parse_metrics(body.decode())

    def metric(self, key: str) -> float:
        return self.metrics().get(key, 0.0)

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n--- server log ---\n{self.log()[-4000:]}")


def start_gunicorn(tmp_dir: Path, env: dict | None = None, app: str = "app:app", ready_timeout: float = 90.0,
                   wait_ready: bool = True, prefix: tuple[str, ...] = (), gate: "Gate | None" = None) -> Server:
    """``prefix``: a command gunicorn runs under (e.g. prlimit or setpriv); ``gate``: serve the app's engine
    behind that gate (gated_engine)."""
    if gate is not None:
        env, app = {**(env or {}), "GATE_DIR": str(gate.path)}, "gated_engine:make_app()"
    port = free_port()
    empty_models = tmp_dir / "no-model"
    empty_models.mkdir(exist_ok=True)
    full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "1", "TORCH_THREADS": "1",
                "MODEL_DIR": str(empty_models), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
                **(env or {})}
    log_path = tmp_dir / f"gunicorn-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), app],
                                cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc, port, log_path)
    if wait_ready:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                if server.request("GET", "/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                stop_gunicorn(server)
                raise AssertionError(f"gunicorn not ready after {ready_timeout} s:\n{server.log()[-4000:]}")
            time.sleep(0.1)
    return server


def stop_gunicorn(server: Server, timeout: float = 15.0) -> int | None:
    """SIGTERM the master, then SIGKILL its whole process group if it lingers."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers too; the group is the one this test started
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    return proc.returncode


@contextmanager
def gunicorn(tmp_dir: Path, env: dict | None = None, app: str = "app:app", **kwargs):
    """start_gunicorn as a context: stopped at the end."""
    server = start_gunicorn(tmp_dir, env, app, **kwargs)
    try:
        yield server
    except BaseException:  # the server's side of a failing test, in pytest's report
        sys.stderr.write(f"---- gunicorn log (tail) ----\n{server.log()[-6000:]}\n")
        raise
    finally:
        stop_gunicorn(server)


@pytest.fixture(scope="module")
def gated_server(tmp_path_factory):
    """One gunicorn (Piper voice behind a gate) for the queue/timeout/streaming/disconnect tests of a module:
    QUEUE_SIZE=1, REQUEST_TIMEOUT=3."""
    tmp = tmp_path_factory.mktemp("gated")
    gate = Gate(tmp / "gate")
    with gunicorn(tmp, {"QUEUE_SIZE": "1", "REQUEST_TIMEOUT": "3"}, gate=gate) as server:
        server.gate = gate
        yield server


@pytest.fixture
def gserver(gated_server):
    """The module's gated server with the gate open and no mode, after each test too."""
    gated_server.gate.release()
    yield gated_server
    gated_server.gate.release()
    gated_server.wait_for(lambda: gated_server.metric("cosyvoice_in_progress") == 0
                          and gated_server.metric("cosyvoice_queue_depth") == 0, 15, "idle server")
