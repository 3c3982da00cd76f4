# llamad on llama.cpp's CUDA server image, which ships /app/llama-server.
# RunPod-ready: data_dir is auto-detected (/runpod-volume, then /workspace), MODEL_NAME is honoured,
# the platform health-checks :8001/ping and sends traffic to :8000.
#   docker build -t llamad .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v /srv/models:/workspace/models -e MODEL_NAME=model.gguf llamad
# The volume must be writable by uid 1000 (logs go to {data_dir}/logs).
# Behind a proxy that re-signs TLS, or with a package index of your own, give pip its settings and CA bundle
# as build secrets (used by the pip steps, never stored in the image):
#   --secret id=pipconf,src=pip.conf --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt
# The wheel stage needs no CUDA: `--target wheel` builds it anywhere. Keep Dockerfile.cpu in step.
ARG BASE=ghcr.io/ggml-org/llama.cpp:server-cuda
ARG PYTHON=python:3.11-slim-bookworm

# The llamad wheel and the list of what it requires: any Python >= 3.11 builds them, no GPU base needed.
FROM ${PYTHON} AS wheel
COPY setup.cfg pyproject.toml README.md /src/llamad/
COPY llamad /src/llamad/llamad
COPY twisted /src/llamad/twisted
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    export PIP_CONFIG_FILE=/run/secrets/pipconf PIP_DISABLE_PIP_VERSION_CHECK=1 \
    && if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
    && python3 -m venv /tmp/venv \
    && /tmp/venv/bin/pip wheel --no-cache-dir --no-deps -w /wheels /src/llamad \
    && /tmp/venv/bin/python -c 'import email, glob, zipfile; \
w = zipfile.ZipFile(glob.glob("/wheels/llamad-*.whl")[0]); \
meta = email.message_from_bytes(w.read(next(n for n in w.namelist() if n.endswith(".dist-info/METADATA")))); \
print("\n".join(r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r))' >/wheels/requirements.txt \
    && rm -rf /tmp/venv /src/llamad

FROM ${BASE}
# llamad needs Python >= 3.11: the distribution's python3 if it is new enough, else python3.11. It starts
# llama-server with util-linux's setsid and setpriv (the parent-death signal).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv util-linux \
    && if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
           apt-get install -y --no-install-recommends python3.11 python3.11-venv; fi \
    && rm -rf /var/lib/apt/lists/*
# uid 1000 is llamad's (some bases, Ubuntu 24.04's among them, give it to a user of their own).
RUN if getent passwd 1000 >/dev/null; then userdel "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && useradd --system --uid 1000 --create-home --home-dir /home/llamad llamad \
    && mkdir -p /workspace && chown llamad:llamad /workspace
# What llamad requires first, then llamad: a change to llamad's code alone reuses the layer of its requirements.
# Then Twisted's plugin cache, written now (llamad's user cannot write it) and a second after the plugin: a
# layer keeps whole seconds, and Twisted rescans a plugin file as new as its cache.
COPY --from=wheel /wheels/requirements.txt /tmp/llamad/
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    export PIP_CONFIG_FILE=/run/secrets/pipconf PIP_DISABLE_PIP_VERSION_CHECK=1 \
    && if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
    && PY=$(command -v python3.11 || command -v python3) \
    && "$PY" -m venv /opt/llamad \
    && /opt/llamad/bin/pip install --no-cache-dir -r /tmp/llamad/requirements.txt
COPY --from=wheel /wheels/ /tmp/llamad/
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    export PIP_CONFIG_FILE=/run/secrets/pipconf PIP_DISABLE_PIP_VERSION_CHECK=1 \
    && if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
    && /opt/llamad/bin/pip install --no-cache-dir --no-deps /tmp/llamad/llamad-*.whl \
    && rm -rf /tmp/llamad \
    && sleep 1 \
    && /opt/llamad/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'

ENV PATH=/opt/llamad/bin:$PATH \
    LLAMA_SERVER_BIN=/app/llama-server \
    PYTHONUNBUFFERED=1
USER llamad
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/ping', timeout=2)"
ENTRYPOINT ["twistd", "-n", "--pidfile=", "llamad"]
