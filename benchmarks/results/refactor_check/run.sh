#!/usr/bin/env bash
# $1 = tree (/work/old or /work/main), $2 = out prefix
set -e
cd $1
export PYTHONPATH=$1 OMP_NUM_THREADS=1
python -c "import lowbit; print(lowbit.__file__)"
python benchmarks/quant_table.py --set core --configs "rtn-w4-g128-asym,rtn-w4-ch-sym,rtn-w4-g32-asym-floatzero (=GGUF Q4_1 grid),w8a8-dynamic,fp8-dynamic" --seqlen 512 --windows 4 --out $2/core --no-cache-models
python benchmarks/quant_table.py --set methods --configs "gptq-w4-g128,awq-w4-g128,smoothquant-dynamic,llm-int8,zeroquant-w4-g128-a8-lkd,kv-int8" --nsamples 4 --calib-seqlen 512 --seqlen 512 --windows 4 --out $2/methods --no-cache-models --reuse $2/core/state.json
