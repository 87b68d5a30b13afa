#!/bin/bash
# Build .gpu/ (git-ignored) for tools/gpu_check.sh on the device machine: what its image lacks.
#   numpy 2.4 (numba-cuda 0.30 breaks on the image's numpy 2.5), Ray 2.60 repacked without its Java jars
#   and JS source maps (the full wheel is over the 64 MiB carry limit) plus the four packages Ray needs
#   that the image lacks, F16, and (optional) the original DIP code for the side-by-side run.
# Usage: [ORIGINAL=DIR_WITH_models_AND_utils] bash tools/prepare_gpu_carry.sh [--no-ray]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/whl
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
dl() { python3 -m pip download -q --no-deps $PLAT -d .gpu/whl "$@"; }
dl "numpy==2.4.6"
if [ "${1:-}" != "--no-ray" ]; then
    dl "ray==2.60.0" jsonschema jsonschema-specifications referencing rpds-py
    w=$(ls .gpu/whl/ray-2.60.0-*.whl)
    tmp=$(mktemp -d)
    (cd $tmp && python3 -m zipfile -e "$OLDPWD/$w" . && rm -rf ray/jars && find . -name '*.js.map' -delete)
    rm "$w"
    (cd $tmp && python3 -c "import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:
    for root, _, files in os.walk('.'):
        for f in files:
            p = os.path.join(root, f)
            z.write(p, os.path.relpath(p, '.'))" "$OLDPWD/$w")
    rm -rf $tmp
fi
cp ../shared/data/dip-repo/denoising/F16_GT.png .gpu/
if [ -n "${ORIGINAL:-}" ]; then
    mkdir -p .gpu/orig && cp -r "$ORIGINAL/models" "$ORIGINAL/utils" .gpu/orig/
fi
du -sh .gpu/whl/* .gpu
