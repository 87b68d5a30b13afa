#!/bin/bash
# One device call that checks and times what needs a GPU. Run from the repo root on the device machine
# with .gpu/ carried (build it here first: `ORIGINAL=path/to/original bash tools/prepare_gpu_carry.sh`).
# Stages (default: all, in this order): speed ray quality f16 original kernels; optional: elastic canvas
#   bash tools/gpu_check.sh speed ray      # only those
# Each stage has its own time box; details go to $OUT, a short summary is printed last.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STAGES=${*:-speed ray quality f16 original kernels}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    2>&1 | grep -v -i warn
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, numpy, numba; print('torch', torch.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)" | tee -a $OUT/gpu.txt
run() { local t=$1; shift; echo "=== [$SECONDS s] $*" | tee -a $OUT/log.txt; timeout $t "$@" 2>&1 | grep -v -E "Warning|warn\(" | tee -a $OUT/log.txt | tail -20; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has speed; then
    run 100 python3 -m pipeline.cli bench speed --device cuda --size 256 --batch 16,32 --precision tf32 --steps 10 --json $OUT/speed256.json
    # grouped vs per-slot convolutions, each profiled (time by kind of kernel) to show what bounds the 512² step
    run 150 python3 -m pipeline.cli bench speed --device cuda --size 512 --batch 8,16 --precision bf16 --conv grouped,loop --steps 8 --profile 3 --json $OUT/speed512.json
fi
if has ray; then
    run 150 python3 -m pipeline.bench.ray --bench 32 --size 256 --steps 300 --device cuda --json $OUT/ray.json
fi
if has quality; then
    run 300 python3 -m pipeline.bench.quality --suite all --only F16,baby,bird,butterfly,head,woman,house --json $OUT/quality.json
fi
if has f16; then
    run 130 python3 tools/f16_quality.py --image .gpu/F16_GT.png --seeds 0,1 --precision bf16 --output ema --steps 3000 --json $OUT/f16_bf16.json
fi
if has original && [ -d .gpu/orig ]; then
    run 150 python3 .gpu/orig_f16.py 0 $OUT/f16_original.json
fi
if has kernels; then
    run 150 python3 -m pipeline.bench.kernels --json $OUT/kernels.json
fi
if has elastic; then  # not in the default list: a fixed against an elastic batch on a draining queue
    run 120 python3 tools/elastic_bench.py --device cuda --size 256 --slots 16 --images 16 --long 600 --short 60 --json $OUT/elastic.json
fi
if has canvas; then  # not in the default list: mixed sizes, canvas policies bucket / ladder / common
    run 240 python3 tools/canvas_bench.py --device cuda --preset denoise --images 48 --min 192 --max 320 --steps 100 --repeats 1 --json $OUT/canvas.json
fi
echo "=== summary [$SECONDS s]"
grep -h -E "^(single|batched)|^    profile|^F16|^ORIGINAL|images/h|^(masked|sr_x4)|^engine step|^elastic/fixed|^canvas " $OUT/log.txt
