# llamad on llama.cpp's CUDA server image, which ships /app/llama-server.
# RunPod-ready: data_dir is auto-detected (/runpod-volume, then /workspace), MODEL_NAME is honoured,
# the platform health-checks :8001/ping and sends traffic to :8000.
#   docker build -t llamad .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v /srv/models:/workspace/models -e MODEL_NAME=model.gguf llamad
# The volume must be writable by uid 1000 (logs go to {data_dir}/logs).
ARG BASE=ghcr.io/ggml-org/llama.cpp:server-cuda
FROM ${BASE}

# llamad needs Python >= 3.11: the distribution's python3 if it is new enough, else python3.11.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv util-linux \
    && if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
           apt-get install -y --no-install-recommends python3.11 python3.11-venv; fi \
    && rm -rf /var/lib/apt/lists/*
COPY . /src/llamad
RUN PY=$(command -v python3.11 || command -v python3) \
    && "$PY" -m venv /opt/llamad \
    && /opt/llamad/bin/pip install --no-cache-dir /src/llamad \
    && rm -rf /src/llamad \
    && useradd --system --uid 1000 --create-home --home-dir /home/llamad llamad \
    && mkdir -p /workspace && chown llamad:llamad /workspace

ENV PATH=/opt/llamad/bin:$PATH \
    LLAMA_SERVER_BIN=/app/llama-server \
    PYTHONUNBUFFERED=1
USER llamad
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/ping', timeout=2)"
ENTRYPOINT ["twistd", "-n", "--pidfile=", "llamad"]
