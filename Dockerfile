# llamad on llama.cpp's CUDA server image, which ships /app/llama-server.
# (The image cannot be built on the development machines; the entrypoint's
# command line is exercised by the integration tests in a venv.)
FROM ghcr.io/ggml-org/llama.cpp:server-cuda

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY . /src/llamad
RUN python3 -m venv /opt/llamad \
    && /opt/llamad/bin/pip install --no-cache-dir /src/llamad \
    && rm -rf /src/llamad

ENV PATH=/opt/llamad/bin:$PATH \
    LLAMA_SERVER_BIN=/app/llama-server
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/ping', timeout=2)"
ENTRYPOINT ["twistd", "-n", "--pidfile=", "llamad"]
