#!/usr/bin/env bash
# Build the Docker image with podman on a machine without a Docker engine, run it, wait for /ready,
# synthesise with /tts and check the WAV, then Wyoming (Home Assistant): from the same container (WYOMING_URI=on)
# and from the image's alternative command (python -m cosyvoice_lite wyoming). With MODEL the engine must be the
# model's (a mount the app does not take would fall back to the offline voice); Wyoming must list the voices HTTP
# lists. Prints the image size, the seconds from `podman run` to /ready and to Wyoming, and first-audio times.
#
#   scripts/container_test.sh                 # offline voice (no model mounted)
#   MODEL=models/tiny scripts/container_test.sh   # with a model directory mounted at /app/models/CosyVoice-300M-SFT
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash ../shared/tools/podman-base.sh)"
TAG=${TAG:-localhost/cosyvoice-lite:test}
PORT=${PORT:-18080}
NAME=cosyvoice-lite-test-$$

echo "== build ($BASE_TAG)"
podman build --format docker --build-arg BASE="$BASE_TAG" --build-arg PIP_FIND_LINKS=/wheels \
  --volume "${PIP_FIND_LINKS:-/opt/wheels}":/wheels:ro -t "$TAG" . 2>&1 | tail -n 5
size=$(podman image inspect "$TAG" --format '{{.Size}}')
echo "image size: $((size / 1000000)) MB"

mount=()
if [ -n "${MODEL:-}" ]; then mount=(-v "$(readlink -f "$MODEL")":/app/models/CosyVoice-300M-SFT:ro); fi
cleanup() { podman logs "$NAME" 2>&1 | tail -n 20; podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
# With a model mounted the engine must be CosyVoice: a mount that the app does not take falls back to the offline
# voice, and every check below would still pass.
if [ -n "${MODEL:-}" ]; then engine=cosyvoice; else engine=piper; fi
since() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }
# The lines that tell which engine a container loaded, when it listened and warmed up, and its Wyoming requests.
server_log() {
  podman logs "$1" 2>&1 | grep -E ' engine: |model\.loader: loaded|wyoming: serving|runtime \(|warmed up|WYOMING' || true
}
echo "== run"
start=$(date +%s.%N)
podman run -d --name "$NAME" -e WYOMING_URI=on -p 127.0.0.1:$PORT:8080 "${mount[@]}" "$TAG" >/dev/null

echo "== wait for /ready"
for i in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; then break; fi
  sleep 1
  [ "$i" = 120 ] && { echo "not ready after 120 s"; exit 1; }
done
echo "ready $(since "$start") s after podman run"
curl -fsS "http://127.0.0.1:$PORT/ready" | tee /tmp/container_test_ready.json; echo
curl -fsS "http://127.0.0.1:$PORT/speakers" | tee /tmp/container_test_speakers.json; echo
python3 - "$engine" <<'PY'
import json, sys
ready = json.load(open("/tmp/container_test_ready.json"))
assert ready["engine"] == sys.argv[1], f"engine {ready['engine']!r}, expected {sys.argv[1]!r} (is the model mounted?)"
PY
echo "== HEALTHCHECK (the image's)"
podman healthcheck run "$NAME" && echo healthy

echo "== POST /tts"
# an English voice where the engine has one, else its first
speaker=$(python3 -c 'import json; s = json.load(open("/tmp/container_test_speakers.json"))["speakers"]; print(next((v for v in s if v["language"] == "en"), s[0])["id"])')
speakers=$(python3 -c 'import json; print(json.dumps([v["id"] for v in json.load(open("/tmp/container_test_speakers.json"))["speakers"]]))')
curl -fsS -X POST "http://127.0.0.1:$PORT/tts" -H 'Content-Type: application/json' \
  -d "{\"text\": \"Hello from the container. This is a test.\", \"speaker\": \"$speaker\"}" -o /tmp/container_test.wav
python3 - <<'PY'
import wave
with wave.open("/tmp/container_test.wav") as w:
    rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
print(f"wav: {rate} Hz, {channels} channel(s), {8 * width}-bit, {frames / rate:.2f} s")
assert (rate, channels, width) == (24000, 1, 2) and frames > 0, "unexpected WAV format"
PY
# A Wyoming client inside the container (the image has the wyoming library): describe -> info, whose voices must be
# the ones HTTP lists (the same engine and model); then synthesize twice -> audio-start/chunks/stop, timed.
wyoming_check() {
  podman exec -i -e START="$start" -e SPEAKERS="$speakers" -e SPEAKER="$speaker" "$1" python - <<'PY'
import asyncio, json, os, time
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

async def synthesize(client, text, voice):
    sent = time.time()
    await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
    pcm, start, first = 0, None, None
    while True:
        event = await asyncio.wait_for(client.read_event(), 120)
        assert event is not None and event.type != "error", event
        if event.type == "audio-start":
            start = (event.data["rate"], event.data["width"], event.data["channels"])
        elif event.type == "audio-chunk":
            first = first or time.time() - sent
            pcm += len(event.payload)
        elif event.type == "audio-stop":
            break
    assert start == (24000, 2, 1) and pcm > 0, (start, pcm)
    return pcm / 48000, first, time.time() - sent

async def main():
    for _ in range(600):  # the standalone server listens once its model is loaded
        try:
            client = AsyncTcpClient("127.0.0.1", 10200)
            await client.connect()
            break
        except OSError:
            await asyncio.sleep(0.2)
    else:
        raise SystemExit("nothing listens on 10200 after 120 s")
    print(f"wyoming: connected {time.time() - float(os.environ['START']):.1f} s after podman run")
    await client.write_event(Describe().event())
    event = await asyncio.wait_for(client.read_event(), 30)
    assert event is not None and Info.is_type(event.type), event
    program = Info.from_event(event).tts[0]
    voices = {v.description: v.name for v in program.voices}
    assert sorted(voices) == sorted(json.loads(os.environ["SPEAKERS"])), (sorted(voices), os.environ["SPEAKERS"])
    print(f"wyoming: info {program.description!r}, {len(voices)} voices")
    voice = voices[os.environ["SPEAKER"]]
    # two texts, so that the second is synthesised too (not an audio cache hit)
    for label, text in (("first", "Hello from Home Assistant."), ("second", "The kitchen lights are off.")):
        seconds, first, total = await synthesize(client, text, voice)
        print(f"wyoming: {label} synthesize ({voice}): {seconds:.2f} s of 24 kHz 16-bit mono, "
              f"first audio after {first:.2f} s, all after {total:.2f} s")
    await client.disconnect()

asyncio.run(main())
PY
}
echo "== Wyoming beside HTTP (WYOMING_URI=on)"
wyoming_check "$NAME"
server_log "$NAME"

echo "== Wyoming alone (python -m cosyvoice_lite wyoming)"
podman rm -f "$NAME" >/dev/null
start=$(date +%s.%N)
# with the health check that the Dockerfile's header gives for this command (the image's own asks HTTP)
podman run -d --name "$NAME" "${mount[@]}" \
  --health-cmd "python -c \"import socket; socket.create_connection(('127.0.0.1', 10200), 4)\"" \
  "$TAG" python -m cosyvoice_lite wyoming >/dev/null
wyoming_check "$NAME"
server_log "$NAME"
podman healthcheck run "$NAME" && echo healthy
echo "== container test passed"
