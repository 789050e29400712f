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
    nvfp4-xlate)  # the MMA kernel with x read late (fewer registers) against x read with the words
      python3 benchmarks/nvfp4.py --sweep --sweep-focus xlate --sweep-m "${SWEEP_M:-1,16}" --sweep-shapes 4096:14336 \
        --suffix 7_xlate --budget-s "${SWEEP_S:-240}" --out "$OUT" 2>&1 | grep -v Warning | tail -4
      python3 - "$OUT" <<'PY'
import glob, json, sys
for path in glob.glob(sys.argv[1] + "/nvfp4_sweep7_xlate_*.json"):
    rows = [r for r in json.load(open(path))["results"] if "us" in r]
    for m in sorted({r["M"] for r in rows}):
        best = {}
        for r in rows:
            if r["M"] == m and r.get("all_written") and r["rel_err"] < 1e-2:
                key = (r["x_late"], r["ahead"])
                if key not in best or r["us"] < best[key]["us"]:
                    best[key] = r
        for (xl, ah), r in sorted(best.items()):
            print(f"M={m} x_late={xl} ahead={ah}: {r['us']:.1f} us ({r['speedup']:.2f}x bf16 {r['bf16_us']:.1f}) "
                  f"w{r['num_warps']} bn{r['block_n']} s{r['split_k']} err {r['rel_err']:.1e}")
PY
      ;;
    nvfp4-floor)  # how fast the packed weight's bytes can be read at all
      python3 benchmarks/nvfp4_floor.py 2>&1 | tee "$OUT/nvfp4_floor.txt" | grep -v Warning ;;
    nvfp4-kwarps)  # the MMA kernel with K split between the warps of a program
      python3 benchmarks/nvfp4.py --sweep --sweep-focus kwarps --sweep-m "${SWEEP_M:-1,16}" \
        --sweep-shapes "${SWEEP_SHAPES:-4096:14336}" --suffix 8_kwarps --budget-s "${SWEEP_S:-300}" --out "$OUT" 2>&1 \
        | grep -v Warning | tail -6
      python3 - "$OUT" <<'PY'
import glob, json, sys
for path in glob.glob(sys.argv[1] + "/nvfp4_sweep8_kwarps_*.json"):
    rows = [r for r in json.load(open(path))["results"] if "us" in r and r.get("all_written") and r["rel_err"] < 1e-2]
    for key in sorted({(r["M"], r["K"], r["N"]) for r in rows}):
        sel = sorted((r for r in rows if (r["M"], r["K"], r["N"]) == key), key=lambda r: r["us"])
        print(key, "bf16", round(sel[0]["bf16_us"], 1))
        for r in sel[:10]:
            print(f"   {r['us']:.1f} us {r['speedup']:.2f}x kw{r['kwarps']} w{r['num_warps']} bn{r['block_n']} "
                  f"s{r['split_k']} a{r['ahead']} xl{r['x_late']}")
    errs = [r for r in json.load(open(path))["results"] if "error" in r or r.get("rel_err", 0) >= 1e-2]
    print("bad configs:", len(errs), errs[:3])
PY
      ;;
    nvfp4-tiled)  # the MMA kernel reading the weight in tile order against the row layout
      python3 benchmarks/nvfp4.py --sweep --sweep-focus tiled --sweep-m "${SWEEP_M:-1,16}" \
        --sweep-shapes "${SWEEP_SHAPES:-4096:14336}" --suffix 9_tiled --budget-s "${SWEEP_S:-300}" --out "$OUT" 2>&1 \
        | grep -v Warning | tail -6
      python3 - "$OUT" <<'PY'
import glob, json, sys
for path in glob.glob(sys.argv[1] + "/nvfp4_sweep9_tiled_*.json"):
    res = json.load(open(path))["results"]
    rows = [r for r in res if "us" in r and r.get("all_written") and r["rel_err"] < 1e-2]
    for key in sorted({(r["M"], r["K"], r["N"]) for r in rows}):
        print(key, "bf16", round([r for r in rows if (r["M"], r["K"], r["N"]) == key][0]["bf16_us"], 1))
        for tiled in (0, 1):
            sel = sorted((r for r in rows if (r["M"], r["K"], r["N"]) == key and r["tiled"] == tiled), key=lambda r: r["us"])
            for r in sel[:5]:
                print(f"   tiled={tiled} {r['us']:.1f} us {r['speedup']:.2f}x kw{r['kwarps']} w{r['num_warps']} "
                      f"bn{r['block_n']} s{r['split_k']} a{r['ahead']}")
    bad = [r for r in res if "error" in r or not r.get("all_written") or r.get("rel_err", 1) >= 1e-2]
    print("bad configs:", len(bad), [(r.get("error"), r.get("rel_err"), r.get("tiled")) for r in bad[:3]])
PY
      ;;
    nvfp4-xlate2)  # x read per chunk against per tile, weight in tile order
      python3 benchmarks/nvfp4.py --sweep --sweep-focus xlate2 --sweep-m "${SWEEP_M:-1,16}" \
        --sweep-shapes "${SWEEP_SHAPES:-4096:14336}" --suffix 10_xlate2 --budget-s "${SWEEP_S:-300}" --out "$OUT" 2>&1 \
        | grep -v Warning | tail -6
      python3 - "$OUT" <<'PY'
import glob, json, sys
for path in glob.glob(sys.argv[1] + "/nvfp4_sweep10_xlate2_*.json"):
    res = json.load(open(path))["results"]
    rows = [r for r in res if "us" in r and r.get("all_written") and r["rel_err"] < 1e-2]
    for key in sorted({(r["M"], r["K"], r["N"]) for r in rows}):
        print(key, "bf16", round([r for r in rows if (r["M"], r["K"], r["N"]) == key][0]["bf16_us"], 1))
        for xl in (1, 2):
            sel = sorted((r for r in rows if (r["M"], r["K"], r["N"]) == key and r["x_late"] == xl), key=lambda r: r["us"])
            for r in sel[:4]:
                print(f"   x_late={xl} {r['us']:.1f} us {r['speedup']:.2f}x kw{r['kwarps']} w{r['num_warps']} "
                      f"bn{r['block_n']} s{r['split_k']} a{r['ahead']}")
    bad = [r for r in res if "error" in r or not r.get("all_written") or r.get("rel_err", 1) >= 1e-2]
    print("bad configs:", len(bad), [(r.get("error"), r.get("rel_err")) for r in bad[:3]])
PY
      ;;
    nvfp4-maxnreg)  # register caps on the best tile-order configurations
      python3 benchmarks/nvfp4.py --sweep --sweep-focus maxnreg --sweep-m "${SWEEP_M:-1,16}" \
        --sweep-shapes "${SWEEP_SHAPES:-4096:14336}" --suffix 11_maxnreg --budget-s "${SWEEP_S:-300}" --out "$OUT" 2>&1 \
        | grep -v Warning | tail -6
      python3 - "$OUT" <<'PY'
import glob, json, sys
for path in glob.glob(sys.argv[1] + "/nvfp4_sweep11_maxnreg_*.json"):
    res = json.load(open(path))["results"]
    rows = [r for r in res if "us" in r and r.get("all_written") and r["rel_err"] < 1e-2]
    for key in sorted({(r["M"], r["K"], r["N"]) for r in rows}):
        print(key, "bf16", round([r for r in rows if (r["M"], r["K"], r["N"]) == key][0]["bf16_us"], 1))
        for cap in (0, 104, 96, 80):
            sel = sorted((r for r in rows if (r["M"], r["K"], r["N"]) == key and r["maxnreg"] == cap), key=lambda r: r["us"])
            for r in sel[:3]:
                print(f"   maxnreg={cap} {r['us']:.1f} us {r['speedup']:.2f}x kw{r['kwarps']} w{r['num_warps']} "
                      f"bn{r['block_n']} s{r['split_k']} a{r['ahead']}")
    bad = [r for r in res if "error" in r or not r.get("all_written") or r.get("rel_err", 1) >= 1e-2]
    print("bad configs:", len(bad), [(r.get("error"), r.get("rel_err")) for r in bad[:3]])
PY
      ;;
    nvfp4)  # the kernel table and the decode benchmark
      python3 benchmarks/nvfp4.py --out "$OUT" 2>&1 | grep -v Warning | tail -40 ;;
    nvfp4-decode)  # only the decode benchmark
      python3 benchmarks/nvfp4.py --decode-only --out "$OUT" 2>&1 | grep -v Warning | tail -30 ;;
    tests-attn)  # GPU tests of the attention kernel and pass
      python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/kernels/test_flash_attention.py \
        tests/passes/test_attention_kernels.py tests/passes/test_attention.py > "$OUT/tests_attn.log" 2>&1
      grep -E "^E  |^FAILED|passed|failed" "$OUT/tests_attn.log" | grep -v DEBUG | head -30 ;;
    attn-docs)  # the FlexAttention route on document masks
      python3 benchmarks/attention.py --variants docs8+causal --shapes 128:4096,128:16384,64:4096 --rep 50 \
        --suffix _docs --out "$OUT" 2>&1 | grep -v "^ *(\|autotune" | tail -16 ;;
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
