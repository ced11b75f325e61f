#!/usr/bin/env bash
# Build the Docker image with podman on a machine without a Docker engine, run it, wait for /ready,
# synthesise with /tts and check the WAV, then Wyoming (Home Assistant): from the same container (WYOMING_URI=on)
# and from the image's alternative command (python -m cosyvoice_lite wyoming). Prints the image size.
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
echo "== run"
podman run -d --name "$NAME" -e WYOMING_URI=on -p 127.0.0.1:$PORT:8080 "${mount[@]}" "$TAG" >/dev/null

echo "== wait for /ready"
for i in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; then break; fi
  sleep 1
  [ "$i" = 120 ] && { echo "not ready after 120 s"; exit 1; }
done
curl -fsS "http://127.0.0.1:$PORT/ready"; echo
curl -fsS "http://127.0.0.1:$PORT/speakers"; echo

echo "== POST /tts"
speaker=$(curl -fsS "http://127.0.0.1:$PORT/speakers" | python3 -c 'import json,sys; print(json.load(sys.stdin)["speakers"][0]["id"])')
curl -fsS -X POST "http://127.0.0.1:$PORT/tts" -H 'Content-Type: application/json' \
  -d "{\"text\": \"Hello from the container. This is a test.\", \"speaker\": \"$speaker\"}" -o /tmp/container_test.wav
python3 - <<'PY'
import wave
with wave.open("/tmp/container_test.wav") as w:
    rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
print(f"wav: {rate} Hz, {channels} channel(s), {8 * width}-bit, {frames / rate:.2f} s")
assert (rate, channels, width) == (24000, 1, 2) and frames > 0, "unexpected WAV format"
PY
# A Wyoming client inside the container (the image has the wyoming library): synthesize -> audio-start/chunks/stop.
wyoming_check() {
  podman exec -i "$1" python - <<'PY'
import asyncio, time
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize

async def main():
    for _ in range(120):  # the standalone server listens once its model is loaded
        try:
            client = AsyncTcpClient("127.0.0.1", 10200)
            await client.connect()
            break
        except OSError:
            await asyncio.sleep(1)
    else:
        raise SystemExit("nothing listens on 10200 after 120 s")
    await client.write_event(Synthesize(text="Hello from Home Assistant.").event())
    pcm, start = 0, None
    while True:
        event = await asyncio.wait_for(client.read_event(), 120)
        assert event is not None and event.type != "error", event
        if event.type == "audio-start":
            start = (event.data["rate"], event.data["width"], event.data["channels"])
        elif event.type == "audio-chunk":
            pcm += len(event.payload)
        elif event.type == "audio-stop":
            break
    await client.disconnect()
    assert start == (24000, 2, 1) and pcm > 0, (start, pcm)
    print(f"wyoming: {pcm / 48000:.2f} s of 24 kHz 16-bit mono")

asyncio.run(main())
PY
}
echo "== Wyoming beside HTTP (WYOMING_URI=on)"
wyoming_check "$NAME"

echo "== Wyoming alone (python -m cosyvoice_lite wyoming)"
podman rm -f "$NAME" >/dev/null
podman run -d --name "$NAME" "${mount[@]}" "$TAG" python -m cosyvoice_lite wyoming >/dev/null
wyoming_check "$NAME"
echo "== container test passed"
