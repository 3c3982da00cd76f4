#!/usr/bin/env bash
# Build llama-server from the llama.cpp sources vendored in the pinned
# llama-cpp-python sdist, cache it under ~/.cache/llamad, and link it into a venv.
# Usage: build-llama-server.sh VERSION VENV
set -euo pipefail

version=${1:?usage: build-llama-server.sh VERSION VENV}
venv=${2:?usage: build-llama-server.sh VERSION VENV}
cache=${LLAMAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamad}
# Bump the recipe tag when the build flags change, so old caches are not reused.
recipe=static1
prefix="$cache/llama-server-$version-$recipe"
bin="$prefix/bin/llama-server"

if [ ! -x "$bin" ]; then
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    started=$SECONDS
    echo "llamad: building llama-server from llama-cpp-python==$version (about 5 min on 2 cores)"
    "$venv/bin/pip" download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$version" -d "$work/sdist"
    tar -xzf "$work"/sdist/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
    echo "llamad: configuring (cmake)"
    cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >"$work/cmake.log" 2>&1 || { cat "$work/cmake.log"; exit 1; }
    # Only the build's progress is shown (each new 10 %); the whole output is in build.log.
    bash "$(dirname "$0")/progress.sh" "$work/build.log" "llamad: compiling llama-server" \
        cmake --build "$work/build" --target llama-server -j"${JOBS:-2}" || exit 1
    # A static build: one relocatable file with no shared libraries to keep beside it.
    rm -rf "$prefix.tmp"
    mkdir -p "$prefix.tmp"
    cp -a "$work/build/bin" "$prefix.tmp/bin"
    rm -rf "$prefix"
    mv "$prefix.tmp" "$prefix"
    elapsed=$((SECONDS - started))
    printf 'llamad: llama-server built in %dm%02ds (cached in %s)\n' $((elapsed / 60)) $((elapsed % 60)) "$prefix"
fi

ln -sfn "$bin" "$venv/bin/llama-server"
echo "llamad: llama-server ready: $venv/bin/llama-server -> $bin"
