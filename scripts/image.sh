#!/usr/bin/env bash
# Build llamad's container image with podman, on a machine that may reach no container registry: the bases
# are made here (debootstrap, then scripts/base.Containerfile, which puts the llama-server that `make setup`
# built at /app/llama-server, as llama.cpp's server image does), and pip in the build gets this machine's
# package index settings and CA bundle as build secrets, so a proxy that re-signs TLS works and neither is
# stored in the image. Everything is cached: the Debian tarball and image, and the build's layers.
#
# Usage (from the checkout's root):
#   image.sh build [DOCKERFILE [TAG [PODMAN-BUILD-ARG...]]]   default: Dockerfile.cpu llamad:cpu
#   image.sh base       make the local bases (cached) and print their names: server, python
#   image.sh conf       print the containers.conf this machine needs (empty: podman's own settings do)
#   image.sh podman ARG...   podman with that config
# Environment:
#   BASE, PYTHON       images for the Dockerfiles' BASE and PYTHON: set BASE to use llama.cpp's own server
#                      image and no local base (PYTHON then defaults to the Dockerfile's)
#   PIP_CONF           the pip config given to the build (default: this machine's index settings)
#   CA_BUNDLE          the CA bundle given to the build (default: the one this machine's pip trusts)
#   LLAMA_SERVER_BIN   the llama-server for the local base (default: .venv/bin/llama-server)
#   CONTEXT            the build context (default: the checkout)
#   DEBIAN_MIRROR      debootstrap's mirror (default: http://deb.debian.org/debian)
#   CONTAINERS_CONF    when set, used as it is
set -euo pipefail

cache=${LLAMAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamad}/image
suite=bookworm
# Bump the recipe tag when the Debian base changes (suite, packages), so an old tarball is not reused.
recipe=r1
# minbase has no OpenMP runtime and no OpenSSL: llama-server links both.
packages=libgomp1,libssl3
debian=localhost/llamad-base:$suite-$recipe
here=$(cd "$(dirname "$0")" && pwd)

say() { echo "llamad: $*" >&2; }
die() { say "$*"; exit 1; }
took() { local s=$((SECONDS - $1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# The containers.conf for what this machine lacks, or nothing when podman's defaults work here:
# crun refuses cgroups v1 and hybrid hierarchies (runc runs there), the systemd cgroup manager and journald
# events need a running systemd, and podman's default ulimits may exceed this machine's hard limits (nproc
# at most 32768: higher values, even under the hard limit, can be refused where podman runs in a container).
conf() {
    if [ -n "${CONTAINERS_CONF:-}" ]; then echo "$CONTAINERS_CONF"; return; fi
    local containers=() engine=() nofile nproc
    nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
    [ "$nproc" != unlimited ] && [ "$nproc" -lt 32768 ] || nproc=32768
    if [ "$nofile" != unlimited ] && [ "$nofile" -lt 1048576 ]; then
        containers+=("default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]")
    fi
    if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && command -v runc >/dev/null; then
        engine+=('runtime = "runc"')
    fi
    if [ ! -d /run/systemd/system ]; then
        engine+=('cgroup_manager = "cgroupfs"' 'events_logger = "file"')
    fi
    [ ${#containers[@]} -gt 0 ] || [ ${#engine[@]} -gt 0 ] || return 0
    mkdir -p "$cache"
    { echo "# For podman on this machine, written by scripts/image.sh."
      echo "[containers]"; printf '%s\n' "${containers[@]}"
      echo "[engine]"; printf '%s\n' "${engine[@]}"; } >"$cache/containers.conf"
    echo "$cache/containers.conf"
}

run_podman() {
    local file
    file=$(conf)
    if [ -n "$file" ]; then CONTAINERS_CONF=$file podman "$@"; else podman "$@"; fi
}

# Debian from debootstrap, imported as an image; its tarball is kept, so a reset image store costs an
# import, not a download.
debian_image() {
    run_podman image exists "$debian" && return
    local tarball="$cache/$suite-$recipe.tar" started=$SECONDS
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || die "the local base needs debootstrap (Debian: apt-get install debootstrap)"
        [ "$(id -u)" = 0 ] || die "debootstrap needs root; or set BASE to llama.cpp's server image"
        mkdir -p "$cache"
        local root
        root=$(mktemp -d "$cache/debootstrap.XXXXXX")
        trap "rm -rf '$root'" EXIT
        say "making a Debian $suite base with debootstrap (about 2 min)"
        debootstrap --variant=minbase --include="$packages" "$suite" "$root" \
            "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$cache/debootstrap.log" 2>&1 \
            || { tail -20 "$cache/debootstrap.log" >&2; die "debootstrap failed (its log: $cache/debootstrap.log)"; }
        rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
        tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
        trap - EXIT
    fi
    run_podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' "$tarball" "$debian" >/dev/null
    say "base $debian made in $(took "$started")"
}

# The two bases of the Dockerfiles: built with layers, so an unchanged llama-server changes nothing.
bases() {
    local bin=${LLAMA_SERVER_BIN:-.venv/bin/llama-server}
    [ -x "$bin" ] || die "no llama-server at $bin: run \`make setup\` first, or set LLAMA_SERVER_BIN"
    bin=$(readlink -f "$bin")
    mkdir -p "$cache"
    debian_image
    local context
    context=$(mktemp -d)
    trap "rm -rf '$context'" EXIT
    mkdir "$context/app"
    cp "$bin" "$context/app/llama-server"
    find "$(dirname "$bin")" -maxdepth 1 -name '*.so*' -exec cp -a {} "$context/app/" \;
    for stage in server python; do
        run_podman build --layers --format docker --build-arg DEBIAN="$debian" --target "$stage" \
            -t "localhost/llamad-base:$stage" -f "$here/base.Containerfile" "$context" >"$cache/base-$stage.log" 2>&1 \
            || { tail -20 "$cache/base-$stage.log" >&2; die "could not build the $stage base"; }
    done
    rm -rf "$context"
    trap - EXIT
}

# The pip config for the build: PIP_CONF, or this machine's index settings (its `pip config list`) without
# what names a local file (find-links and file: indexes, constraints, the CA bundle, which goes apart).
# Prints the CA bundle to give: CA_BUNDLE, or the one this machine's pip trusts.
pip_settings() {
    local out=$1 pip=python3
    [ -x .venv/bin/python ] && pip=.venv/bin/python
    "$pip" - "$out" "${PIP_CONF:-}" "${CA_BUNDLE:-}" <<'EOF'
import ast, os, shutil, subprocess, sys

out, given_conf, given_ca = sys.argv[1:4]
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings: dict[str, dict[str, str]] = {}
for line in listed.splitlines():
    name, _, value = line.partition("=")
    section, _, key = name.rpartition(".")
    settings.setdefault(key, {})[section] = ast.literal_eval(value) if value[:1] in "'\"" else value

def setting(key: str) -> str:
    """As pip reads it: the environment, then the install command's section, then global."""
    by = settings.get(key, {})
    return by.get(":env:", by.get("install", by.get("global", "")))

if given_conf:
    shutil.copy(given_conf, out)
else:
    lines = ["[global]"]
    for key in ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries", "proxy"):
        words = setting(key).split()
        if key.endswith("url"):
            words = [w for w in words if w.startswith(("http://", "https://"))]
        if words:
            lines.append(f"{key} = " + "\n    ".join(words))
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
ca = given_ca or next((p for p in (setting("cert"), os.environ.get("REQUESTS_CA_BUNDLE", ""),
                                   os.environ.get("SSL_CERT_FILE", ""), "/etc/ssl/certs/ca-certificates.crt")
                       if p and os.path.isfile(p)), "")
print(ca)
EOF
}

build() {
    local dockerfile=${1:-Dockerfile.cpu} tag=${2:-llamad:cpu}
    shift $(($# < 2 ? $# : 2))
    command -v podman >/dev/null || die "building the image needs podman (Debian: apt-get install podman runc; \
\`make setup\` installs it as root); with Docker see docs/operations.md#building-the-image"
    local started=$SECONDS args=()
    if [ -z "${BASE:-}" ]; then
        bases
        args+=(--build-arg BASE=localhost/llamad-base:server --build-arg PYTHON=localhost/llamad-base:python)
    else
        args+=(--build-arg "BASE=$BASE")
        [ -z "${PYTHON:-}" ] || args+=(--build-arg "PYTHON=$PYTHON")
    fi
    local secrets ca
    secrets=$(mktemp -d)
    trap "rm -rf '$secrets'" EXIT
    ca=$(pip_settings "$secrets/pip.conf")
    args+=(--secret "id=pipconf,src=$secrets/pip.conf")
    [ -z "$ca" ] || args+=(--secret "id=cacert,src=$ca")
    local pip_from=${PIP_CONF:-"this machine's index settings"} ca_from=${ca:-"pip's own"}
    say "building $tag from $dockerfile (pip: $pip_from, CA bundle: $ca_from)"
    # The docker format keeps HEALTHCHECK, which the OCI format has no field for.
    run_podman build --layers --format docker "${args[@]}" -f "$dockerfile" -t "$tag" "$@" "${CONTEXT:-.}"
    say "$tag built in $(took "$started")"
}

case ${1:-build} in
    build) shift $(($# ? 1 : 0)); build "$@" ;;
    base) bases; echo localhost/llamad-base:server; echo localhost/llamad-base:python ;;
    conf) conf ;;
    podman) shift; run_podman "$@" ;;
    *) echo "usage: image.sh build [DOCKERFILE [TAG [PODMAN-BUILD-ARG...]]] | base | conf | podman ARG..." >&2; exit 2 ;;
esac
