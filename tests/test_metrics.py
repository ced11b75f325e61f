"""/metrics: every route counted under a label of its own, and the figures of several processes added up
(prometheus_client's multiprocess mode, as gunicorn runs it)."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, gunicorn, parse_metrics

sys.path.insert(0, str(ROOT / "scripts"))

from load_test import server_pids  # noqa: E402

from cosyvoice_lite.serve.hooks import ENDPOINT_LABELS, endpoint_label  # noqa: E402
from cosyvoice_lite.service.metrics import OTHER, Metrics  # noqa: E402


def test_every_route_has_an_endpoint_label(piper_app):
    routes = {rule.rule: rule.endpoint for rule in piper_app.url_map.iter_rules()}
    assert {"/tts", "/v1/audio/speech", "/v1/models", "/v1/models/<path:model>", "/metrics"} <= set(routes)
    unlabelled = {path for path, endpoint in routes.items() if endpoint_label(endpoint) == OTHER}
    assert not unlabelled, f"routes counted as 'other' on /metrics: {unlabelled}; add them to ENDPOINT_LABELS"
    assert set(ENDPOINT_LABELS.values()) <= set(Metrics.ENDPOINTS)


def test_model_requests_are_counted_as_models(client):
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models/tts-1").status_code == 200
    assert client.get("/v1/models/no-such-model").status_code == 404
    values = parse_metrics(client.get("/metrics").data.decode())
    assert values['cosyvoice_requests_total{code="200",endpoint="models"}'] == 2
    assert values['cosyvoice_requests_total{code="404",endpoint="models"}'] == 1
    assert not any('endpoint="other"' in key for key in values)


def test_an_unknown_path_is_counted_as_other(client):
    assert client.get("/no/such/page").status_code == 404
    values = parse_metrics(client.get("/metrics").data.decode())
    assert values['cosyvoice_requests_total{code="404",endpoint="other"}'] == 1


def test_each_app_counts_from_zero(make_app, piper_engine):
    first, second = make_app(piper_engine).test_client(), make_app(piper_engine).test_client()
    first.get("/health")
    values = parse_metrics(second.get("/metrics").data.decode())
    assert 'cosyvoice_requests_total{code="200",endpoint="health"}' not in values


# Several processes sharing one PROMETHEUS_MULTIPROC_DIR, as gunicorn's master and workers do (without a model).
_PROCESSES = """
import json, os
from prometheus_client import multiprocess
from cosyvoice_lite.service.metrics import Metrics

metrics = Metrics()  # in the 'master', before the fork, as with preload_app

def start_worker():  # two requests, then one waiting and one synthesising until told to exit
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        metrics.observe_request("tts", 200, 1.5, chars=10, audio_seconds=2.0, synth_seconds=0.5)
        metrics.observe_request("speech", 503)
        metrics.set_queue(1, 1)
        os.write(ready_w, b"x")
        os.read(go_r, 1)
        os._exit(0)
    os.read(ready_r, 1)
    return pid, go_w

def stop_worker(pid, go_w):
    os.write(go_w, b"x")
    os.waitpid(pid, 0)

exited, alive = start_worker(), start_worker()
stop_worker(*exited)
multiprocess.mark_process_dead(exited[0])  # gunicorn_conf.child_exit does this for every exited worker
lines = [line.rsplit(" ", 1) for line in metrics.render("piper", True, 9).splitlines() if not line.startswith("#")]
stop_worker(*alive)
print(json.dumps({key: float(value) for key, value in lines}))
"""


def test_counters_add_up_over_processes_and_gauges_over_the_live_ones(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _PROCESSES], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    values = json.loads(out.stdout)
    # counters: both workers', the exited one's included
    assert values['cosyvoice_requests_total{code="200",endpoint="tts"}'] == 2
    assert values['cosyvoice_requests_total{code="503",endpoint="speech"}'] == 2
    assert values['cosyvoice_errors_total{code="503"}'] == 2
    assert values["cosyvoice_audio_seconds_total"] == 4.0 and values["cosyvoice_characters_total"] == 20
    assert values["cosyvoice_request_duration_seconds_count"] == 2
    assert values['cosyvoice_request_duration_seconds_bucket{le="2.5"}'] == 2
    # gauges: the live worker's only
    assert values["cosyvoice_queue_depth"] == 1 and values["cosyvoice_in_progress"] == 1
    assert values["cosyvoice_workers"] == 1
    assert values['cosyvoice_engine_info{engine="piper"}'] == 1


def _load_gunicorn_conf(then: str, **env) -> subprocess.CompletedProcess:
    """Load the gunicorn configuration in a fresh process, as gunicorn's master does, then run ``then``."""
    ours = ("PROMETHEUS_MULTIPROC_DIR", "COSYVOICE_METRICS_DIR_OF")
    inherited = {k: v for k, v in os.environ.items() if k not in ours}
    code = "import os\nimport cosyvoice_lite.serve.gunicorn_conf as conf\n" + then
    return subprocess.run([sys.executable, "-c", code], env={**inherited, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=60)


def test_each_server_start_gets_an_empty_metrics_directory_removed_at_exit():
    out = _load_gunicorn_conf("assert os.environ['PROMETHEUS_MULTIPROC_DIR'] == conf.metrics_dir\n"
                              "print(conf.metrics_dir, len(os.listdir(conf.metrics_dir)))")
    assert out.returncode == 0, out.stderr
    path, files = out.stdout.split()
    assert files == "0" and not os.path.exists(path)


def test_a_given_metrics_directory_is_wiped_at_start_and_kept(tmp_path):
    (tmp_path / "counter_1.db").write_bytes(b"a previous run's counts")
    (tmp_path / "notes.txt").write_text("not ours")
    out = _load_gunicorn_conf("", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_killed_worker_leaves_the_queue_gauges_and_its_counts_stay(tmp_path):
    with gunicorn(tmp_path, {"WORKERS": "2"}) as server:
        for i in range(4):
            assert server.request("POST", "/tts", {"text": f"Number {i}."})[0] == 200
        server.wait_for(lambda: server.metric("cosyvoice_workers") == 2, 20, "both workers to report")
        _, workers = server_pids(server.port)
        os.kill(workers[0], signal.SIGKILL)
        server.wait_for(lambda: len(set(server_pids(server.port)[1]) - set(workers)) == 1, 30, "a new worker")
        time.sleep(2)  # the new worker registers right after its fork (post_worker_init)
        for _ in range(4):  # whichever worker answers
            values = parse_metrics(server.request("GET", "/metrics")[2].decode())
            assert values["cosyvoice_workers"] == 2  # the killed one no longer counted, its replacement is
            assert values['cosyvoice_requests_total{code="200",endpoint="tts"}'] == 4


def test_the_measured_speed_is_shown_once_cosyvoice_has_spoken(make_app, cosyvoice_engine):
    client = make_app(cosyvoice_engine).test_client()
    assert client.post("/tts", json={"text": "Measure me, please.", "cache": False}).status_code == 200
    values = parse_metrics(client.get("/metrics").data.decode())
    assert 0 < values["cosyvoice_realtime_factor"] < 1  # the tiny model speaks many times faster than real time


def test_an_engine_that_does_not_measure_its_speed_shows_none(client):
    client.post("/tts", json={"text": "Count me."})
    assert "cosyvoice_realtime_factor" not in parse_metrics(client.get("/metrics").data.decode())
