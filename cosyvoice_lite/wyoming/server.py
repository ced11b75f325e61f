"""The Wyoming server: a listening socket, an asyncio loop on a thread of its own, a Connection per client.

Two ways to run it over one SynthesisService:
- ``cosyvoice-lite wyoming``: one process, the service alone (``run``);
- beside HTTP: with WYOMING_URI set, every gunicorn worker starts it on a thread after the fork
  (``start_in_thread``, serve/gunicorn_conf.py) over the service its Flask app already holds, so the model is in
  memory once per worker; each worker binds with SO_REUSEPORT and the kernel spreads connections over them.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import logging
import signal
import socket
import sys
import threading

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from ..service import SynthesisService
from .connection import Connection
from .framing import MAX_HEADER_BYTES, Limits

log = logging.getLogger("cosyvoice_lite")

ATTRIBUTION = {
    "cosyvoice": Attribution(name="FunAudioLLM (CosyVoice-300M)", url="https://github.com/FunAudioLLM/CosyVoice"),
    "piper": Attribution(name="rhasspy (Piper)", url="https://github.com/rhasspy/piper"),
}


class ZeroconfMissing(RuntimeError):
    pass


class WyomingServer:
    def __init__(self, service: SynthesisService, host: str, port: int, zeroconf_name: str = ""):
        self.service = service
        self.host, self.port = host, port
        self.zeroconf_name = zeroconf_name
        settings = service.settings
        self.limits = Limits.for_text(settings.max_text_chars, settings.header_timeout + settings.body_timeout,
                                      settings.wyoming_idle_timeout)
        if zeroconf_name and importlib.util.find_spec("zeroconf") is None:
            raise ZeroconfMissing("WYOMING_ZEROCONF needs the zeroconf package: pip install zeroconf==0.154.0")
        self.sock = listen(host, port)  # bound now, so that a taken port fails the start, not a thread later
        self.port = self.sock.getsockname()[1]

    async def serve_forever(self) -> None:
        server = await asyncio.start_server(self._connection, sock=self.sock, limit=MAX_HEADER_BYTES)
        if self.zeroconf_name:
            await self._announce()
        log.info("wyoming: serving tcp://%s:%d (%d voices, no authentication)", self.host, self.port,
                 len(self.service.voices.voices))
        async with server:
            await server.serve_forever()

    def describe(self) -> Info:
        return describe(self.service)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Connection(self, reader, writer).serve()

    async def _announce(self) -> None:
        from wyoming.zeroconf import HomeAssistantZeroconf

        host = None if self.host in ("0.0.0.0", "::", "") else self.host  # None: the address that reaches mDNS
        self._zeroconf = HomeAssistantZeroconf(port=self.port, name=self.zeroconf_name, host=host)
        await self._zeroconf.register_server()
        log.info("wyoming: announced as %s._wyoming._tcp.local.", self.zeroconf_name)

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=lambda: asyncio.run(self.serve_forever()), name="wyoming", daemon=True)
        thread.start()
        return thread


def describe(service: SynthesisService) -> Info:
    """``info``: every voice as a TtsVoice with its language: the engine's own by readable name (their ids answer
    too), then the saved voices by id (the name a voice was given need not be unique)."""
    engine = service.engine
    attribution = ATTRIBUTION.get(engine.name, Attribution(name=engine.name, url=""))
    voices = [TtsVoice(name=v.name, attribution=attribution, installed=True, description=v.id, version=None,
                       languages=[v.language]) for v in service.voices.voices]
    voices += [TtsVoice(name=meta["id"], attribution=attribution, installed=True,
                        description=f"{meta.get('name') or meta['id']} (saved voice)", version=None,
                        languages=[meta.get("language") or "und"]) for meta in service.saved_voices()]
    return Info(tts=[TtsProgram(name="cosyvoice-lite", attribution=attribution, installed=True,
                                description=engine.description or engine.name, version=_version(),
                                voices=voices, supports_synthesize_streaming=True)])


def _version() -> str | None:
    try:
        return importlib.metadata.version("cosyvoice-lite")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout
        return None


def listen(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so that every gunicorn worker can bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def start_in_thread(service: SynthesisService, announce: bool = True) -> WyomingServer:
    """Beside HTTP, in a gunicorn worker: serve WYOMING_URI on a thread over ``service``. ``announce``: this worker
    announces it (one announcement per machine, not one per worker)."""
    host, port = service.settings.wyoming_address()
    server = WyomingServer(service, host, port, service.settings.wyoming_zeroconf if announce else "")
    server.start_in_thread()
    return server


def run(uri: str | None = None, zeroconf: str | None = None) -> int:
    """``cosyvoice-lite wyoming``: the service alone, in this process, until interrupted."""
    from ..engines import StartupError, load_engine
    from ..settings import Settings
    from ..voices import VoiceMapError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        logging.getLogger().setLevel(settings.log_level.upper())
        host, port = settings.wyoming_address(uri)
        service = SynthesisService(settings, load_engine(settings))
        server = WyomingServer(service, host, port, settings.wyoming_zeroconf if zeroconf is None else zeroconf)
    except (StartupError, VoiceMapError, ValueError, ZeroconfMissing, OSError) as error:
        print(f"cosyvoice-lite: cannot start: {error}", file=sys.stderr)
        return 3
    # serve once warm (connections made meanwhile wait in the bound socket's backlog): a request served during the
    # warm-up would wait for the backend's conversion and skew the speed the warm-up measures for the time budgets
    service.admission.ensure_started()
    log.info("warming up the engine before serving tcp://%s:%d", host, port)
    service.admission.wait_ready(None)
    if service.admission.failure:
        print(f"cosyvoice-lite: cannot start: {service.admission.failure}", file=sys.stderr)
        service.close()
        return 3
    # SIGTERM (docker stop; PID 1 ignores it without a handler) ends the loop like Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(server.serve_forever())
    except KeyboardInterrupt:
        pass
    finally:
        service.close()
    return 0
