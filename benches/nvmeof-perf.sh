#!/usr/bin/env bash
# NVMe/TCP target benchmark (not a timed test): nvmeof-perf against nvmeof-target with
# a memory namespace over loopback, 4 KiB randread and randwrite at QD 1, 32 and 128 on
# one queue. Records IOPS, latency percentiles and the target's CPU time per I/O
# (utime+stime of the target process from /proc/PID/stat around each run), and writes
# the table into docs/benchmarks.md, section "NVMe/TCP target".
#
#   benches/nvmeof-perf.sh                 # 10 s per point
#   DURATION=5s QDS="1 32" benches/nvmeof-perf.sh
#   NO_DOC=1 benches/nvmeof-perf.sh        # print only
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
QDS=${QDS:-1 32 128}
WORKLOADS=${WORKLOADS:-randread randwrite}
QUEUES=${QUEUES:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
NQN=nqn.2026-11.io.dpu-offload:bench

cargo build --release --locked -p nvmeof --bins >&2
BIN=$TARGET_DIR/release

work=$(mktemp -d)
target_pid=
cleanup() {
  if [ -n "$target_pid" ]; then kill "$target_pid" 2>/dev/null || true; wait "$target_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$BIN/nvmeof-target" --listen 127.0.0.1:0 --subsystem "$NQN" --memory 1GiB \
  --allow-any-host --ready-file "$work/addr" >"$work/target.out" 2>"$work/target.err" &
target_pid=$!
for _ in $(seq 200); do [ -s "$work/addr" ] && break; sleep 0.05; done
addr=$(cat "$work/addr")
echo "nvmeof-target pid $target_pid listening on $addr" >&2

# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
clk_tck=$(getconf CLK_TCK)

# Fill the namespace region once so reads do not hit unallocated chunks only.
"$BIN/nvmeof-perf" --target "$addr" --subsystem "$NQN" --workload write --block-size 131072 \
  --queue-depth 8 --queues 1 --duration 3s --json >/dev/null

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
rows=()
for wl in $WORKLOADS; do
  for qd in $QDS; do
    before=$(cpu_ticks "$target_pid")
    json=$("$BIN/nvmeof-perf" --target "$addr" --subsystem "$NQN" --workload "$wl" \
      --block-size 4096 --queue-depth "$qd" --queues "$QUEUES" --duration "$DURATION" --json)
    after=$(cpu_ticks "$target_pid")
    row=$(python3 - "$json" "$before" "$after" "$clk_tck" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
ticks = int(sys.argv[3]) - int(sys.argv[2])
cpu_s = ticks / int(sys.argv[4])
ios = r["ios"]
us_per_io = cpu_s / ios * 1e6 if ios else float("nan")
lat = r["latency_us"]
busy = cpu_s / r["duration_s"]
print(f'| {r["workload"]} | {r["queue_depth"]} | {r["queues"]} | {r["iops"]:,.0f} | '
      f'{lat["mean"]:.1f} | {lat["p50"]:.1f} | {lat["p99"]:.1f} | {lat["p99_9"]:.1f} | '
      f'{cpu_s:.2f} | {us_per_io:.2f} | {busy:.2f} |')
EOF
)
    echo "$row" >&2
    rows+=("$row")
  done
done

cmd="DURATION=$DURATION QDS=\"$QDS\" QUEUES=$QUEUES benches/nvmeof-perf.sh"
table=$(
  echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores ($(uname -r)), loopback, release build,"
  echo "1 GiB memory namespace (512-byte blocks), 4 KiB I/O, one client process"
  echo "(\`nvmeof-perf\`) on the same machine, produced by \`$cmd\`."
  echo "Target CPU = utime+stime of the \`nvmeof-target\` process during the run."
  echo "Load average when the runs started: $load_before (other jobs shared the machine)."
  echo
  echo "| workload | QD | queues | IOPS | mean us | p50 us | p99 us | p99.9 us | target CPU s | target CPU us/IO | target cores busy |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
)
echo "$table"

if [ -z "${NO_DOC:-}" ]; then
  python3 - docs/benchmarks.md "$table" <<'EOF'
import os, sys
path, table = sys.argv[1], sys.argv[2]
begin, end = "<!-- nvmeof-target-bench:begin -->", "<!-- nvmeof-target-bench:end -->"
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
block = f"{begin}\n{table}\n{end}"
if begin in text and end in text:
    a = text.index(begin)
    b = text.index(end) + len(end)
    text = text[:a] + block + text[b:]
else:
    text = text.rstrip("\n") + "\n\n## NVMe/TCP target\n\n" + block + "\n"
open(path, "w").write(text)
EOF
  echo "updated docs/benchmarks.md" >&2
fi
