#!/bin/bash
# One device call that checks and times everything that needs a GPU. Run from the repo root on the
# device machine, with .gpu/ carried (numpy 2.4 wheel for numba-cuda, F16, the original code for the
# side-by-side run). Details go to $OUT; a short table is printed last.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/np24 .gpu/whl/numpy-2.4.*-cp312-*.whl
export PYTHONPATH=/tmp/np24:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, numpy, numba; print('torch', torch.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)" | tee -a $OUT/gpu.txt
run() { local t=$1; shift; echo "=== [$SECONDS s] $*"; timeout $t "$@" 2>&1 | tee -a $OUT/log.txt | tail -25; }
run 90 python3 -m pipeline.cli bench speed --device cuda --size 512 --batch 4,8,16 --steps 15 --json $OUT/speed512.json
run 60 python3 -m pipeline.cli bench speed --device cuda --size 256 --batch 16,32 --steps 15 --json $OUT/speed256.json
run 170 python3 tools/f16_quality.py --image .gpu/F16_GT.png --seeds 0,1 --precision tf32 --json $OUT/f16_tf32.json
run 110 python3 .gpu/orig_f16.py 0 $OUT/f16_original.json
if [ $SECONDS -lt 330 ]; then run 120 python3 tools/f16_quality.py --image .gpu/F16_GT.png --seeds 0,1 --precision bf16 --json $OUT/f16_bf16.json; fi
if [ $SECONDS -lt 430 ]; then run 40 python3 -m kernels.bench --json $OUT/kernels.json; fi
echo "=== summary [$SECONDS s]"
grep -h -E "^(single|batched)|^F16|^ORIGINAL" $OUT/log.txt
