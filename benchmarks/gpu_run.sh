#!/usr/bin/env bash
# Checks and timings on a GPU machine, one call: bash benchmarks/gpu_run.sh STAGE... (see below).
# Logs and result files go to $OUT (default ./out). Needs torchao as a wheel in .whl/ for the FP8
# tests (installed into /tmp/site).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
# One focused sweep of benchmarks/nvfp4.py and its summary: focus_sweep FOCUS SUFFIX BY TOP
# (SWEEP_M, SWEEP_SHAPES, SWEEP_S override the M values, the K:N shapes and the time budget).
focus_sweep() {
  python3 benchmarks/nvfp4.py --sweep --sweep-focus "$1" --sweep-m "${SWEEP_M:-1,16}" \
    --sweep-shapes "${SWEEP_SHAPES:-4096:14336}" --suffix "$2" --budget-s "${SWEEP_S:-300}" --out "$OUT" 2>&1 \
    | grep -v Warning | tail -6
  python3 benchmarks/sweep_summary.py "$OUT" "$2" --by "$3" --top "$4"
}
for stage in "$@"; do
  start=$(date +%s)
  case "$stage" in
    tests-nvfp4-flex)  # GPU tests of the NVFP4 kernels and the Flex path
      python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/kernels/test_nvfp4.py tests/kernels/test_flex.py \
        tests/passes/test_attention_flex.py > "$OUT/tests_nvfp4_flex.log" 2>&1
      grep -E "^E  |^FAILED|passed|failed|Error" "$OUT/tests_nvfp4_flex.log" | grep -v DEBUG | head -60 ;;
    tests-mma)  # GPU tests of the NVFP4 MMA kernel only
      python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -k "mma or subnormal" tests/kernels/test_nvfp4.py \
        > "$OUT/tests_mma.log" 2>&1
      grep -E "^E  |^FAILED|passed|failed" "$OUT/tests_mma.log" | head -30 ;;
    tests-flex)  # GPU tests of the Flex path only
      python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/kernels/test_flex.py \
        tests/passes/test_attention_flex.py > "$OUT/tests_flex.log" 2>&1
      grep -E "^E  |^FAILED|passed|failed" "$OUT/tests_flex.log" | grep -v DEBUG | head -30 ;;
    tests)  # every GPU test
      python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests > "$OUT/gpu_tests.log" 2>&1
      grep -E "^E  |^FAILED|passed|failed" "$OUT/gpu_tests.log" | grep -v DEBUG | head -60 ;;
    nvfp4-sweep)  # kernel configurations for M = 1, 2, 4
      python3 benchmarks/nvfp4.py --sweep --sweep-m 1,4,8,16 --budget-s "${SWEEP_S:-200}" --out "$OUT" 2>&1 \
        | grep -v Warning | tail -20 ;;
    nvfp4-xlate)  # the MMA kernel with x read late or with the words
      focus_sweep xlate 7_xlate x_late,ahead 1 ;;
    nvfp4-floor)  # how fast the packed weight's bytes can be read at all
      python3 benchmarks/nvfp4_floor.py 2>&1 | tee "$OUT/nvfp4_floor.txt" | grep -v Warning ;;
    nvfp4-kwarps)  # the MMA kernel with K split between the warps of a program
      focus_sweep kwarps 8_kwarps "" 10 ;;
    nvfp4-tiled)  # the MMA kernel reading the weight in tile order against the row layout
      focus_sweep tiled 9_tiled "tiled" 5 ;;
    nvfp4-xlate2)  # x read per chunk against per tile, weight in tile order
      focus_sweep xlate2 10_xlate2 "x_late" 4 ;;
    nvfp4-maxnreg)  # register caps on the best tile-order configurations
      focus_sweep maxnreg 11_maxnreg "maxnreg" 3 ;;
    nvfp4-balance)  # K split in the program and over the grid together (work spread evenly over the SMs)
      focus_sweep balance 14_balance "kwarps,split_k" 1 ;;
    nvfp4)  # the kernel table and the decode benchmark
      python3 benchmarks/nvfp4.py --out "$OUT" 2>&1 | grep -v Warning | tail -40 ;;
    nvfp4-m-range)  # the kernel table at every M kind from 1 to 16 on the target shape (no decode)
      python3 benchmarks/nvfp4.py --ms 1,2,3,4,5,8,9,12,16 --shapes 4096:14336 --no-decode --suffix _mrange \
        --out "$OUT" 2>&1 | grep -v Warning | tail -20 ;;
    nvfp4-variants)  # fp16 activations and bias against bf16
      python3 benchmarks/nvfp4.py --variants --out "$OUT" 2>&1 | grep -v Warning | tail -30 ;;
    nvfp4-decode)  # only the decode benchmark
      python3 benchmarks/nvfp4.py --decode-only --out "$OUT" 2>&1 | grep -v Warning | tail -30 ;;
    tests-attn)  # GPU tests of the attention kernel and pass
      python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/kernels/test_flash_attention.py \
        tests/passes/test_attention_kernels.py tests/passes/test_attention.py > "$OUT/tests_attn.log" 2>&1
      grep -E "^E  |^FAILED|passed|failed" "$OUT/tests_attn.log" | grep -v DEBUG | head -30 ;;
    attn-docs)  # the FlexAttention route on document masks
      python3 benchmarks/attention.py --variants docs8+causal --shapes 128:4096,128:16384,64:4096 --rep 50 \
        --suffix _docs --out "$OUT" 2>&1 | grep -v "^ *(\|autotune" | tail -16 ;;
    measure)  # rewriter report --measure on Llama- and Gemma-2-shaped models (prefill; decode with NVFP4; FP8)
      common="--device cuda --dtype bfloat16 --inductor --measure --layers 4 --hidden 2048"
      python3 -m rewriter report hf:llama $common --heads 16 --batch 4 --seq 2048 \
        --json "$OUT/measure_llama_prefill.json" > "$OUT/measure_llama_prefill.txt" 2>/dev/null
      python3 -m rewriter report hf:gemma2 $common --heads 8 --batch 4 --seq 2048 \
        --json "$OUT/measure_gemma2_prefill.json" > "$OUT/measure_gemma2_prefill.txt" 2>/dev/null
      python3 -m rewriter report hf:llama $common --heads 16 --batch 4 --seq 2048 --mode fast --estimate-for H200 \
        --json "$OUT/measure_llama_prefill_fp8.json" > "$OUT/measure_llama_prefill_fp8.txt" 2>/dev/null
      python3 -m rewriter report hf:llama $common --heads 16 --batch 1 --seq 1 --mode fast --estimate-for H200 \
        --passes attention,fuse_linear,fuse_linear_graph,nvfp4 \
        --json "$OUT/measure_llama_decode_nvfp4.json" > "$OUT/measure_llama_decode_nvfp4.txt" 2>/dev/null
      grep -h "^measured\|^total\|^rewriter report" "$OUT"/measure_*.txt ;;
    measure-decode)  # decode step (batch 1, one token) measured: bf16 and NVFP4, with and without CUDA graphs
      common="--device cuda --dtype bfloat16 --inductor --measure --layers 4 --hidden 2048 --heads 16 --batch 1 --seq 1"
      nv="--mode fast --estimate-for H200 --passes attention,fuse_linear,fuse_linear_graph,nvfp4"
      python3 -m rewriter report hf:llama $common --json "$OUT/decode_bf16.json" > "$OUT/decode_bf16.txt" 2>/dev/null
      python3 -m rewriter report hf:llama $common --cuda-graphs --json "$OUT/decode_bf16_cg.json" > "$OUT/decode_bf16_cg.txt" 2>/dev/null
      python3 -m rewriter report hf:llama $common $nv --json "$OUT/decode_nvfp4.json" > "$OUT/decode_nvfp4.txt" 2>/dev/null
      python3 -m rewriter report hf:llama $common $nv --cuda-graphs --json "$OUT/decode_nvfp4_cg.json" > "$OUT/decode_nvfp4_cg.txt" 2>/dev/null
      for f in "$OUT"/decode_*.txt; do echo "$(basename "$f")"; grep -h "^measured\|^total" "$f"; done ;;
    attn-sm90)  # the Gluon Hopper kernels: their GPU tests, the check and the A/B against Triton, Flex and SDPA
      python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -k sm90 tests/kernels/test_flash_attention.py \
        > "$OUT/tests_sm90.log" 2>&1
      grep -E "^E  |^FAILED|passed|failed" "$OUT/tests_sm90.log" | head -20
      python3 benchmarks/attention_sm90.py --out "$OUT/attention_sm90.md" \
        --bwd-rows 128:4096:alibi,128:4096:window512,128:4096:causal 2>&1 | tail -30
      python3 benchmarks/attention.py --shapes 128:4096 --variants causal,plain --rep 30 --eager-max-s 1 \
        --suffix _sm90 --out "$OUT" 2>&1 | grep -v "^ *(\|autotune" | tail -12 ;;
    attn-d128)  # full sweep, D = 128
      python3 benchmarks/attention.py --shapes 128:1024,128:2048,128:4096,128:8192,128:16384 --rep 30 \
        --eager-max-s 4096 --suffix _d128 --budget "${ATTN_S:-500}" --out "$OUT" 2>&1 | grep -v "^ *(\|autotune" | tail -5 ;;
    attn-d64)  # full sweep, D = 64
      python3 benchmarks/attention.py --shapes 64:1024,64:2048,64:4096,64:8192,64:16384 --rep 30 \
        --eager-max-s 4096 --suffix _d64 --budget "${ATTN_S:-500}" --out "$OUT" 2>&1 | grep -v "^ *(\|autotune" | tail -5 ;;
    linear-table)  # re-measure the linear table the cost model reads (writes rewriter/data/, copied to $OUT)
      python3 benchmarks/linear.py --table --out "$OUT" 2>&1 | grep -v Warning | tail -8
      for f in rewriter/data/linear_*.json; do cp "$f" "$OUT/table_$(basename "$f")"; done ;;
    models)  # whole models against torch.compile
      python3 benchmarks/models.py --out "$OUT" 2>&1 | tail -20 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "== $stage: $(( $(date +%s) - start )) s"
done
