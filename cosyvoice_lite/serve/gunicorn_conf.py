"""gunicorn settings for cosyvoice-lite, from the same environment variables as the app (cosyvoice_lite/settings.py).

Process model: WORKERS processes, the model loaded once in the master before the fork (preload_app) so that the
workers share the weights' memory pages. Each worker is a gthread worker: every admitted request's thread hands it
to the engine's scheduler (MAX_BATCH decoded side by side, QUEUE_SIZE more waiting), spare threads keep /health,
/ready and /metrics answering during long syntheses, and a request beyond the bound gets a 503 at once.
"""
import atexit
import glob
import math
import os
import shutil
import sys
import tempfile

from cosyvoice_lite.settings import Settings

try:
    _settings = Settings.from_env()
except ValueError as _error:  # a bad environment value: one clear line, no traceback, no server
    sys.stderr.write(f"cosyvoice-lite: cannot start: {_error}\n")
    sys.exit(3)

_METRICS_OWNER = "COSYVOICE_METRICS_DIR_OF"  # pid of the master that made PROMETHEUS_MULTIPROC_DIR


def _metrics_dir() -> str:
    """The directory where every process of this server keeps its /metrics figures (prometheus_client's
    multiprocess mode). Set here, in the master before the app is loaded: prometheus_client reads it at import."""
    if os.environ.get(_METRICS_OWNER) == str(os.getpid()):  # this master's own, the configuration read again (HUP)
        return os.environ["PROMETHEUS_MULTIPROC_DIR"]
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given and _METRICS_OWNER not in os.environ:  # the operator's: wiped, or a previous run's counts add up
        os.makedirs(given, exist_ok=True)
        for path in glob.glob(os.path.join(given, "*.db")):
            os.remove(path)
        return given
    # A fresh one per server start; in memory (/dev/shm) where there is one, since every request writes to it.
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else os.path.join(_settings.cache_root, "metrics")
    os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix="cosyvoice-lite-metrics-", dir=base)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    os.environ[_METRICS_OWNER] = str(os.getpid())
    # removed when the master exits, however it exits normally (a server, --check-config, a script reading this file)
    atexit.register(_remove_metrics_dir, path, os.getpid())
    return path


def _remove_metrics_dir(path: str, master: int) -> None:
    if os.getpid() == master:  # not in the forked workers, which run this process's exit handlers too
        shutil.rmtree(path, ignore_errors=True)


metrics_dir = _metrics_dir()

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "cosyvoice_lite.serve.worker.JsonErrorWorker"  # gthread, with refusals as JSON (serve/worker.py)
# Request threads per worker: each admitted request waits for its audio on its own thread (QUEUE_SIZE waiting +
# MAX_BATCH in progress), plus spare threads for health checks, metrics and fast 503 answers.
threads = _settings.queue_size + _settings.max_batch + 8
preload_app = True
timeout = 60                     # a worker silent this long (its main loop stuck) is killed and replaced
# SIGTERM: in-flight requests get this long to finish; by default as long as REQUEST_TIMEOUT allows them, so that a
# restart or a rollout cuts no admitted request.
graceful_timeout = _settings.graceful_timeout or math.ceil(_settings.request_timeout)
keepalive = 5
max_requests = _settings.max_requests  # recycle workers after N requests (0 = never)
max_requests_jitter = max_requests // 10
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"  # heartbeat file off the (possibly slow, overlay) disk
control_socket_disable = True   # gunicornc's socket is not needed (and $HOME may be read-only in a container)
accesslog = None                 # the app writes one line per request itself
loglevel = _settings.log_level
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "root": {"level": _settings.log_level.upper(), "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": _settings.log_level.upper(), "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
    },
}


def post_worker_init(worker):
    """Start this worker's synthesis thread and warm-up now, not at its first request (threads do not survive
    the fork from the preloaded master). With WYOMING_URI set, the worker also serves Wyoming on a thread over the
    same service (the model once per worker; SO_REUSEPORT spreads connections over the workers); the first
    worker alone announces it (WYOMING_ZEROCONF)."""
    service = getattr(worker.wsgi, "extensions", {}).get("cosyvoice_lite")
    if service is not None:
        service.admission.ensure_started()
        if service.settings.wyoming_uri:
            from cosyvoice_lite.wyoming import start_in_thread

            start_in_thread(service, announce=worker.age == 1)


def child_exit(server, worker):
    """A worker has exited (or was killed): its queue gauges leave the sums of /metrics, its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, metrics_dir)
