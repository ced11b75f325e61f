"""Every environment variable the service reads, read here once (documented defaults below; README has the same
table). The rest of the package takes these values as arguments.

The one exception is PASS_THROUGH: variables that belong to the libraries the service runs on (or to the
platform). They are read, or given a default, where they take effect, and are documented here and in the README."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

# name -> what it does and where the package reads or sets it
PASS_THROUGH = {
    "ONEDNN_MAX_CPU_ISA": "oneDNN's cap on its kernels' instructions (in PyTorch and OpenVINO), e.g. AVX2; "
                          "backends/cpu.py reads it so that the precision plan follows the cap",
    "OV_CPU_MAX_ISA": "OpenVINO's own kernels' cap; backends/ov_runtime.py sets it from ONEDNN_MAX_CPU_ISA when only "
                      "that is set (the two must agree), backends/cpu.py reads it like ONEDNN_MAX_CPU_ISA",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "oneDNN's compiled-kernel cache; memory.py sets 64 unless it is set",
    "XDG_CACHE_HOME": "the base of the default CACHE_DIR (default_cache_dir below)",
    "PROMETHEUS_MULTIPROC_DIR": "prometheus_client's directory of per-process /metrics files; serve/gunicorn_conf.py "
                                "makes a fresh one when unset (an operator's own is emptied at start)",
    "COSYVOICE_METRICS_DIR_OF": "not a setting: the master's pid, set by serve/gunicorn_conf.py beside the "
                                "PROMETHEUS_MULTIPROC_DIR it made, so that a configuration read again (HUP) keeps it",
}

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/cosyvoice-lite, else ~/.cache/cosyvoice-lite."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cosyvoice-lite")


def _boolean(raw: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    try:
        return value[raw.lower()]
    except KeyError:
        raise ValueError(raw) from None


@dataclass
class Settings:
    # field = default              # ENV VAR: meaning
    model_dir: str = "models/CosyVoice-300M-SFT"  # MODEL_DIR: CosyVoice model directory; empty/missing -> Piper
    engine: str = "auto"            # ENGINE: auto | cosyvoice | piper
    mode: str = "default"           # COSYVOICE_MODE: exact | default | fast (model/modes.py)
    # MODEL_KIND: auto | base | sft | instruct - what the CosyVoice-300M directory is, hence what it offers (auto:
    # no spk2info.pt -> base; 'instruct' in the directory's name -> instruct; else sft)
    model_kind: str = "auto"
    max_voices: int = 100           # MAX_VOICES: saved voices a server keeps; more -> 409
    # MAX_UPLOAD_BYTES: largest reference or source clip (multipart or base64 JSON body); larger -> 413
    max_upload_bytes: int = 8388608
    # KEEP_VOICE_MODELS: keep the speech tokenizer and speaker encoder loaded between voices (the next one ~1.2 s
    # sooner, ~650-1100 MB held: docs/performance.md#making-voices); default: loaded for each voice, released after
    keep_voice_models: bool = False
    workers: int = 1                # WORKERS: gunicorn worker processes (each holds the model once)
    torch_threads: int = 0          # TORCH_THREADS: CPU threads per worker; 0 = cores / WORKERS
    max_text_chars: int = 4096      # MAX_TEXT_CHARS: longer text -> 413
    max_body_bytes: int = 262144    # MAX_BODY_BYTES: larger request bodies -> 413
    queue_size: int = 8             # QUEUE_SIZE: requests waiting per worker besides those in progress; more -> 503
    max_batch: int = 4              # MAX_BATCH: requests one worker decodes side by side (CosyVoice; Piper: 1)
    request_timeout: float = 300.0  # REQUEST_TIMEOUT: seconds from arrival to the last audio byte; exceeded -> 504
    # HEADER_TIMEOUT / BODY_TIMEOUT: a request's headers and body must all arrive within HEADER_TIMEOUT +
    # BODY_TIMEOUT seconds of its first byte (buffered by the worker's event loop, no thread held) -> else 408
    header_timeout: float = 10.0
    body_timeout: float = 15.0
    write_timeout: float = 30.0     # WRITE_TIMEOUT: seconds each write of a response may take (client not reading)
    # MAX_AUDIO_SECONDS: most audio one request may produce; a text that must give more -> 413, a stream that
    # reaches it ends without its terminating chunk (visibly truncated)
    max_audio_seconds: float = 600.0
    port: int = 8080                # PORT: listen port (gunicorn binds HOST:PORT)
    host: str = "0.0.0.0"           # HOST: listen address
    # GRACEFUL_TIMEOUT: seconds in-flight requests get to finish after SIGTERM; 0 = as long as REQUEST_TIMEOUT
    graceful_timeout: int = 0
    max_requests: int = 0           # MAX_REQUESTS: recycle a worker after this many requests (0 = never)
    cors_origins: str = ""          # CORS_ORIGINS: '*' or comma-separated origins allowed to call from browsers
    # API_KEY: when set, everything but /health, /ready, / and /static needs 'Authorization: Bearer API_KEY'
    api_key: str = field(default="", repr=False)
    log_level: str = "info"         # LOG_LEVEL: debug | info | warning | error
    # CACHE_DIR: on-disk caches of derived data (compiled models, synthesised audio), shared by a machine's
    # workers; empty = $XDG_CACHE_HOME/cosyvoice-lite, else ~/.cache/cosyvoice-lite
    cache_dir: str = ""
    # VOICE_MAP: OpenAI voice names -> speakers on /v1/audio/speech, 'alloy=zh-female,echo=zh-male' (speaker id or
    # alias); laid over the built-in table (serve/openai.py, README)
    voice_map: str = ""
    # CACHE: sentence-level audio cache: 'disk' (under CACHE_DIR/audio), 'off', or a redis:// / rediss:// /
    # unix:// URL shared by several machines
    cache: str = "disk"
    cache_max_mb: int = 1024        # CACHE_MAX_MB: size bound of the disk cache (least recently used goes first)
    cache_ttl: int = 604800         # CACHE_TTL: seconds an entry lives (disk and Redis); 0 = until evicted
    # BACKEND: auto | openvino | torch - runtime of the flow estimator and HiFT (auto: OpenVINO where it is
    # installed and pays on this CPU, see backends/); torch = plain PyTorch everywhere
    backend: str = "auto"
    # WYOMING_URI: the Wyoming (Home Assistant) server's address, tcp://HOST:PORT, or 'on' for the default
    # address: tcp://0.0.0.0:10200, or tcp://127.0.0.1:10200 when API_KEY is set (Wyoming has no authentication).
    # Empty: gunicorn serves no Wyoming (`cosyvoice-lite wyoming` uses the default address). Set: every gunicorn
    # worker also serves it, over the same model (SO_REUSEPORT spreads the connections).
    wyoming_uri: str = ""
    # WYOMING_ZEROCONF: announce the Wyoming server for Home Assistant's discovery (_wyoming._tcp.local.) under
    # this name; empty = no announcement (needs `pip install zeroconf`)
    wyoming_zeroconf: str = ""
    # WYOMING_IDLE_TIMEOUT: seconds a Wyoming connection may stay silent while it waits for nothing -> closed
    wyoming_idle_timeout: float = 60.0
    # COSYVOICE_LITE_TIKTOKEN: Whisper's multilingual.tiktoken vocabulary file; empty = the copy the openai-whisper
    # package ships (frontend/tokenizer.py)
    tiktoken_file: str = ""
    # COSYVOICE_LITE_WETEXT_FSTS: a directory of WeText FSTs, <lang>/tn/{tagger,verbalizer}.fst; empty = the ones the
    # wetext package ships (frontend/wetext_tn.py)
    wetext_fsts: str = ""

    ENV = {
        "model_dir": "MODEL_DIR", "engine": "ENGINE", "mode": "COSYVOICE_MODE", "host": "HOST",
        "model_kind": "MODEL_KIND", "max_voices": "MAX_VOICES", "max_upload_bytes": "MAX_UPLOAD_BYTES",
        "keep_voice_models": "KEEP_VOICE_MODELS",
        "graceful_timeout": "GRACEFUL_TIMEOUT", "max_requests": "MAX_REQUESTS", "workers": "WORKERS",
        "torch_threads": "TORCH_THREADS",
        "max_text_chars": "MAX_TEXT_CHARS", "max_body_bytes": "MAX_BODY_BYTES", "queue_size": "QUEUE_SIZE",
        "max_batch": "MAX_BATCH",
        "request_timeout": "REQUEST_TIMEOUT", "body_timeout": "BODY_TIMEOUT", "port": "PORT",
        "max_audio_seconds": "MAX_AUDIO_SECONDS", "header_timeout": "HEADER_TIMEOUT",
        "write_timeout": "WRITE_TIMEOUT",
        "cors_origins": "CORS_ORIGINS", "api_key": "API_KEY", "log_level": "LOG_LEVEL",
        "cache_dir": "CACHE_DIR", "voice_map": "VOICE_MAP", "cache": "CACHE", "cache_max_mb": "CACHE_MAX_MB",
        "cache_ttl": "CACHE_TTL", "backend": "BACKEND", "wyoming_uri": "WYOMING_URI",
        "wyoming_zeroconf": "WYOMING_ZEROCONF", "wyoming_idle_timeout": "WYOMING_IDLE_TIMEOUT",
        "tiktoken_file": "COSYVOICE_LITE_TIKTOKEN", "wetext_fsts": "COSYVOICE_LITE_WETEXT_FSTS",
    }

    @classmethod
    def from_env(cls, overrides: dict | None = None, environ=None) -> "Settings":
        """Defaults, then environment variables, then ``overrides`` (keys are field names, e.g. 'queue_size')."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(cls.ENV[f.name], "").strip()
            if raw:
                try:
                    values[f.name] = _boolean(raw) if isinstance(f.default, bool) else type(f.default)(raw)
                except ValueError:
                    raise ValueError(f"environment variable {cls.ENV[f.name]} must be a "
                                     f"{type(f.default).__name__}, got {raw!r}") from None
        for key, value in (overrides or {}).items():
            if key in cls.ENV:
                values[key] = value
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        from .model.modes import MODES

        self.mode = self.mode.strip().lower()
        if self.mode not in MODES:
            raise ValueError(f"COSYVOICE_MODE must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.graceful_timeout < 0 or self.max_requests < 0:
            raise ValueError("GRACEFUL_TIMEOUT and MAX_REQUESTS must not be negative")
        if self.model_kind not in ("auto", "base", "sft", "instruct"):
            raise ValueError(f"MODEL_KIND must be auto, base, sft or instruct, got {self.model_kind!r}")
        if self.max_voices < 0 or self.max_upload_bytes < 1024:
            raise ValueError("MAX_VOICES must not be negative and MAX_UPLOAD_BYTES must be at least 1024")
        if self.engine not in ("auto", "cosyvoice", "piper"):
            raise ValueError(f"ENGINE must be auto, cosyvoice or piper, got {self.engine!r}")
        if self.backend not in ("auto", "openvino", "torch"):
            raise ValueError(f"BACKEND must be auto, openvino or torch, got {self.backend!r}")
        for name in ("workers", "max_text_chars", "max_body_bytes", "port", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.ENV[name]} must be at least 1")
        if self.queue_size < 0 or self.torch_threads < 0:
            raise ValueError("QUEUE_SIZE and TORCH_THREADS must not be negative")
        for name in ("request_timeout", "body_timeout", "header_timeout", "write_timeout", "max_audio_seconds",
                     "wyoming_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{self.ENV[name]} must be positive")
        if self.port > 65535:
            raise ValueError(f"PORT must be 1..65535, got {self.port}")
        if self.cache.strip().lower() not in ("disk", "off") and not self.cache.strip().startswith(REDIS_SCHEMES):
            raise ValueError(f"CACHE must be disk, off or a redis:// URL, got {self.cache!r}")
        if self.cache_max_mb < 1 or self.cache_ttl < 0:
            raise ValueError("CACHE_MAX_MB must be at least 1 and CACHE_TTL must not be negative")
        if self.log_level.lower() not in LOG_LEVELS:
            # else gunicorn stops with only "Unable to configure logger 'gunicorn.error'"
            raise ValueError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.wyoming_uri:
            self.wyoming_address()  # raises on a malformed WYOMING_URI
        from .voices.book import parse_voice_map

        parse_voice_map(self.voice_map)  # raises on a malformed VOICE_MAP
        # an override that names nothing would otherwise fail only when the CosyVoice engine loads
        if self.tiktoken_file and not os.path.isfile(self.tiktoken_file):
            raise ValueError(f"COSYVOICE_LITE_TIKTOKEN={self.tiktoken_file} is not a file")
        if self.wetext_fsts and not os.path.isdir(self.wetext_fsts):
            raise ValueError(f"COSYVOICE_LITE_WETEXT_FSTS={self.wetext_fsts} is not a directory")

    @property
    def threads(self) -> int:
        """CPU threads for one worker's engine."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // self.workers)

    def wyoming_address(self, uri: str | None = None) -> tuple[str, int]:
        """(host, port) of ``uri`` (else WYOMING_URI, else the default: all interfaces, or localhost alone when
        API_KEY is set, since Wyoming cannot ask for the key)."""
        uri = (uri or self.wyoming_uri).strip()
        uri = "" if uri.lower() == "on" else uri
        uri = uri or \
            ("tcp://127.0.0.1:10200" if self.api_key else "tcp://0.0.0.0:10200")
        scheme, sep, rest = uri.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme != "tcp" or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"WYOMING_URI must be tcp://HOST:PORT, got {uri!r}")
        return host.strip("[]"), int(port)

    @property
    def cache_root(self) -> str:
        return self.cache_dir or default_cache_dir()

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

