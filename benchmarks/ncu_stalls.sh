#!/usr/bin/env bash
# Stall reasons and pipe utilizations from Nsight Compute for the kernels of benchmarks/profile_kernels.py
# (GPU machine with ncu on PATH): bash benchmarks/ncu_stalls.sh; text reports go to $OUT. (The
# reports in benchmarks/results/ncu/ came from a version that joined the metrics with '|', which
# collected the stall ratios only; they are now separated by commas, ncu's list syntax, not yet run in
# this form.)
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=.
M='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum'
for k in ${KERNELS:-attention nvfp4 nvfp4_xlate}; do
  timeout 200 ncu --nvtx --nvtx-include "profile/" --clock-control ${CLOCKS:-base} --metrics "$M" \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section LaunchStats \
    python3 benchmarks/profile_kernels.py $k > $OUT/ncu_stalls_$k.txt 2>&1
  echo "== $k rc $?"
  grep -E "^\s+(smsp|sm__|dram|gpu__)" $OUT/ncu_stalls_$k.txt | awk '$NF+0 > 0.05 || /duration|dram|issue_active/' | head -50
  grep -E "Duration|Throughput|Occupancy|Registers|Warp Cycles|Issued Ipc|Eligible|Active Warps|No Eligible|Waves|Grid Size|Block Size" $OUT/ncu_stalls_$k.txt | head -40
done
