#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the `llamacpp` inference server kind, docs/serving.md) and llama-bench (for
# bench/vs_llamacpp.py), from the llama.cpp source vendored in
# PyPI's llama-cpp-python sdist (pinned and hash-checked in scripts/llamacpp/requirements.txt), with Debian's
# cmake/ninja/gcc (about 6 minutes on 2 cores). Idempotent: a finished build is kept.
#
#   scripts/llamacpp/build.sh                          # into .llamacpp/ (gitignored; scripts/test runs this)
#   LLAMACPP_DIR=/some/dir scripts/llamacpp/build.sh   # LLAMACPP_JOBS: parallel compile jobs (default 2)
#
# Leaves <dir>/src (llama.cpp's tree, with convert_hf_to_gguf.py, convert_lora_to_gguf.py and gguf-py; the
# converter, `python -m inference.gguf`, runs them), <dir>/build/bin/llama-server and llama-bench, and
# <dir>/VERSION (the sdist's version and hash, the llama.cpp commit it vendors), for recorded figures.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="${LLAMACPP_DIR:-.llamacpp}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
jobs="${LLAMACPP_JOBS:-2}"

# The project venv's pip (the sdist is only downloaded, never installed), or the python the caller names.
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"

for tool in cmake ninja gcc g++; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build.sh: '$tool' not found; on Debian/Ubuntu: apt-get install cmake ninja-build build-essential" >&2
        exit 1
    fi
done

version="$(grep -o 'llama-cpp-python==[^ ]*' "$here/requirements.txt" | cut -d= -f3)"
sdist="$dir/download/llama_cpp_python-$version.tar.gz"
top="llama_cpp_python-$version" # the sdist's top folder

write_version() {
    # The vendored tree carries no git metadata (llama-server --version says "build 0, commit unknown"); the
    # sdist's CHANGELOG names the llama.cpp commit each release vendors: the first such line under its version.
    local commit
    commit="$(tar -xzOf "$sdist" "$top/CHANGELOG.md" | awk -v v="## [$version]" '
        $0 == v { inside = 1; next }
        inside && /^## \[/ { inside = 0 }
        inside && !found && match($0, /llama\.cpp@[0-9a-f]+/) { found = substr($0, RSTART + 10, RLENGTH - 10) }
        END { print found }')"
    {
        echo "llama-cpp-python sdist: $version"
        echo "sha256: $(sha256sum "$sdist" | cut -d' ' -f1)"
        echo "llama.cpp commit (the sdist's CHANGELOG): ${commit:-unknown}"
        echo "llama-server --version: $("$dir/build/bin/llama-server" --version 2>&1 | grep -i '^version' || true)"
    } >"$dir/VERSION"
    cat "$dir/VERSION"
}

if [ -x "$dir/build/bin/llama-server" ] && [ -x "$dir/build/bin/llama-bench" ]; then
    echo "llama.cpp already built in $dir/build/bin (remove $dir/build to rebuild)"
    grep -q '^llama\.cpp commit' "$dir/VERSION" 2>/dev/null || write_version
    exit 0
fi

if [ ! -f "$dir/src/CMakeLists.txt" ]; then
    mkdir -p "$dir/download"
    # --require-hashes: the pinned sha256 is checked before anything is unpacked. --no-binary names the package
    # alone: its sdist (a wheel has no llama.cpp source), while the build backend pip installs to read the sdist's
    # metadata (scikit-build-core, and cmake's wheel where the system's is too old) may come as wheels;
    # `:all:` would compile cmake from source for that.
    "$python" -m pip download --no-deps --no-binary llama-cpp-python --require-hashes \
        -r "$here/requirements.txt" -d "$dir/download"
    rm -rf "$dir/src.tmp"
    mkdir -p "$dir/src.tmp"
    tar -xzf "$sdist" -C "$dir/src.tmp" --strip-components=3 "$top/vendor/llama.cpp"
    rm -rf "$dir/src"
    mv "$dir/src.tmp" "$dir/src"
fi

cmake -S "$dir/src" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON
cmake --build "$dir/build" -j"$jobs" --target llama-server llama-bench
write_version
