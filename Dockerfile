# cosyvoice-lite: CPU-only CosyVoice-300M-SFT TTS service.
#   docker build -t cosyvoice-lite .                                   # model mounted at run time
#   docker build --build-arg DOWNLOAD_MODEL=1 -t cosyvoice-lite:model .  # model baked into the image
#   docker run -p 8080:8080 -v "$PWD/models:/app/models" cosyvoice-lite
#   docker run -p 8080:8080 -p 10200:10200 -e WYOMING_URI=on ... cosyvoice-lite   # HTTP and Home Assistant's Wyoming
#   docker run -p 10200:10200 -v "$PWD/models:/app/models" --health-cmd \
#     "python -c \"import socket; socket.create_connection(('127.0.0.1', 10200), 4)\"" \
#     cosyvoice-lite python -m cosyvoice_lite wyoming                           # Wyoming alone (no HTTP)
ARG BASE=python:3.11-slim
FROM ${BASE}

# Where pip finds the CPU build of torch, torch==X+cpu (PyPI's own Linux torch wheel is the multi-GB GPU build);
# scripts/install_torch.sh falls back to the usual indexes when it is unreachable.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional local wheel folder (used by scripts/container_test.sh on machines without the PyTorch index).
ARG PIP_FIND_LINKS=
ARG DOWNLOAD_MODEL=0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/app/models/CosyVoice-300M-SFT \
    CACHE_DIR=/app/cache \
    PORT=8080

WORKDIR /app
RUN useradd --create-home --uid 10001 app

COPY requirements.txt requirements-nodeps.txt ./
COPY scripts/install_torch.sh ./scripts/
RUN if [ -z "$PIP_FIND_LINKS" ]; then unset PIP_FIND_LINKS; fi \
 && sh scripts/install_torch.sh pip \
 && pip install -r requirements.txt \
 && pip install --no-deps -r requirements-nodeps.txt \
 && find /usr/local/lib /usr/lib -name '__pycache__' -prune -exec rm -rf {} + 2>/dev/null; true

COPY app.py gunicorn.conf.py ./
COPY cosyvoice_lite ./cosyvoice_lite
COPY scripts ./scripts
# With the model baked in, its OpenVINO conversion (and the compiled blobs for the build machine's CPU class) are
# cached in the image too, so the first start does not convert.
RUN mkdir -p /app/models /app/cache/audio \
 && if [ "$DOWNLOAD_MODEL" = "1" ]; then python scripts/download_model.py --dir "$MODEL_DIR" \
      && python scripts/warm_cache.py --model-dir "$MODEL_DIR"; fi \
 && chown -R app:app /app/models /app/cache

USER app
EXPOSE 8080 10200
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
