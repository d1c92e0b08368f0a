#!/usr/bin/env bash
# Mixed load on one dpud reactor (issue 7 item 6): storage IOPS and p99 through NBD
# (fio's nbd engine, 4 KiB random reads at QD 32 on a volume of testbed nodes) with
# and without iperf3 TCP at full rate through dpud's switch between two namespaced
# hosts, and iperf3 with and without the storage load, under two [net] cpu_share
# settings. dpud runs with cores = 1, so volumes and the network poller share one
# reactor thread. Prints one table row per run and the CPU both sides used
# (dpud_net_cpu_seconds_total, dpud_storage_cpu_seconds_total deltas), each as a part
# of the reactor's time (wall time minus the reactor thread's run-queue wait from
# schedstat: the clock the share is defined on), dpud's CPU in all threads and the
# machine's busy CPU time.
#
# usage (root, release binaries): [PROFILE=fast] [JOBS=1] [SECS=8] benches/net-mixed.sh BIN_DIR [SHARES...]
#   BIN_DIR holds dpud, dpuctl, nvmeof-target and testbed (release builds)
set -euo pipefail
bin=$(realpath "$1"); shift
if [ "$#" -gt 0 ]; then shares=("$@"); else shares=(0.2 0.8); fi
secs=${SECS:-8}
profile=${PROFILE:-fast}
jobs=${JOBS:-1}
w=$(mktemp -d /tmp/net-mixed.XXXXXX)
tag=$$
A=nmA$tag; B=nmB$tag; pa=nma$((tag % 10000)); pb=nmb$((tag % 10000))
dpid=""
cleanup() {
  [ -n "$dpid" ] && kill "$dpid" 2>/dev/null && wait "$dpid" 2>/dev/null
  ip netns pids "$B" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$A" 2>/dev/null; ip netns del "$B" 2>/dev/null
  ip link del "$pa" 2>/dev/null; ip link del "$pb" 2>/dev/null
  "$bin/testbed" --workdir "$w/tb" down --purge >/dev/null 2>&1 || true
  rm -rf "$w"
  true
}
trap cleanup EXIT
export TESTBED_NVMEOF_TARGET=$bin/nvmeof-target
"$bin/testbed" --workdir "$w/tb" up --nodes 6 --domains 3 --node-size 2GiB --nodes-only --net loopback >/dev/null

i=1
for ns in $A $B; do
  p=$([ $i = 1 ] && echo $pa || echo $pb)
  ip netns add $ns
  ip link add $p type veth peer name eth0 netns $ns
  sysctl -qw net.ipv6.conf.$p.disable_ipv6=1
  ip link set $p up
  ip -n $ns link set lo up
  ip -n $ns addr add 10.80.0.$i/24 dev eth0
  ip -n $ns link set eth0 up
  ip netns exec $ns ethtool -K eth0 tx off tso off gso off gro off >/dev/null
  ethtool -K $p tx off tso off gso off gro off >/dev/null
  i=$((i + 1))
done
ip netns exec $B iperf3 -s -p 5201 -D

metric() { curl -fsS "http://$maddr/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
# CPU seconds of all of dpud's threads (utime + stime from /proc, 10 ms ticks).
dpud_cpu() { cat /proc/"$dpid"/task/*/stat 2>/dev/null |
  awk -v hz="$(getconf CLK_TCK)" '{ t += $14 + $15 } END { printf "%.2f", t / hz }'; }
# The reactor thread's on-CPU and run-queue-wait seconds (schedstat): their sum over
# the wall time says how much of the run the reactor wanted a CPU.
reactor_sched() { for t in /proc/"$dpid"/task/*; do
  [ "$(cat "$t/comm")" = dpud-reactor-0 ] && awk '{ printf "%.3f %.3f", $1 / 1e9, $2 / 1e9 }' "$t/schedstat"; done; }
now() { date +%s.%N; }
# Busy CPU seconds of the whole machine (everything but idle and iowait).
machine_busy() { awk -v hz="$(getconf CLK_TCK)" '$1 == "cpu" {
  printf "%.2f", ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat; }
fio_run() { # OUT: 4 KiB randread QD32 for $secs s
  fio --name=rr --ioengine=nbd "--uri=nbd+unix:///$vol?socket=$w/d/nbd.sock" --size=256M \
    --rw=randread --bs=4k --iodepth=32 --numjobs="$jobs" --group_reporting --time_based --runtime="$secs" \
    --output-format=json --output="$1" >/dev/null
}
fio_row() { python3 - "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["jobs"][0]["read"]
print(f"{s['iops']:.0f} IOPS, p99 {s['clat_ns']['percentile']['99.000000'] / 1000:.0f} us", end="")
EOF
}
iperf_run() { ip netns exec $A iperf3 -c 10.80.0.2 -t "$secs" -J > "$1"; }
iperf_row() { python3 -c "import json,sys; print(f\"{json.load(open(sys.argv[1]))['end']['sum_received']['bits_per_second']/1e9:.2f} Gbit/s\", end='')" "$1"; }

echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC'), ${secs} s per run, load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
echo "# profile $profile, fio jobs $jobs"
echo "| cpu_share | run | storage (fio 4k randread QD32) | network (iperf3 TCP) | wall s | net CPU s | storage CPU s | net part of reactor CPU | net CPU / wall | reactor on CPU or waiting / wall | net CPU / reactor time | storage CPU / reactor time | dpud CPU s (all threads) | machine busy CPU s | throttled periods |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
k=0
for share in "${shares[@]}"; do
  # A volume per run: the nodes keep the previous run's, and dpud finds it there.
  k=$((k + 1)); vol=v$k
  rm -rf "$w/d"; mkdir -p "$w/d"
  cat > "$w/d/dpud.toml" <<EOF
data_dir = "$w/d/data"
cores = 1
[api]
socket = "$w/d/api.sock"
[metrics]
listen = "127.0.0.1:0"
[nbd]
socket = "$w/d/nbd.sock"
tcp = "127.0.0.1:0"
[net]
cpu_share = $share
EOF
  "$bin/dpud" --config "$w/d/dpud.toml" 2> "$w/d/dpud.log" &
  dpid=$!
  ctl() { "$bin/dpuctl" --socket "$w/d/api.sock" "$@"; }
  for _ in $(seq 100); do ctl net stats >/dev/null 2>&1 && break; sleep 0.1; done
  maddr=$(grep -o 'metrics at http://[0-9.:]*' "$w/d/dpud.log" | head -1 | sed 's|metrics at http://||')
  python3 - "$w/tb/testbed.json" <<'EOF' | while read -r n a q d; do ctl node add "$n" --address "$a" --nqn "$q" --domain "$d" >/dev/null; done
import json, sys
for n in json.load(open(sys.argv[1]))["nodes"]:
    print(n["name"], n["address"], n["nqn"], n["domain"])
EOF
  ctl volume create "$vol" --profile "$profile" --size 1GiB >/dev/null
  ctl export add "$vol" --type nbd >/dev/null
  ctl net port add $pa --access vlan:1 >/dev/null
  ctl net port add $pb --access vlan:1 >/dev/null
  ctl net fw rule add --action allow --port $pa --direction in --protocol tcp --dport 5201 >/dev/null
  fio --name=fill --ioengine=nbd "--uri=nbd+unix:///$vol?socket=$w/d/nbd.sock" --size=256M \
    --rw=write --bs=1M --iodepth=8 --output-format=json >/dev/null
  for run in storage network both; do
    n0=$(metric dpud_net_cpu_seconds_total); s0=$(metric dpud_storage_cpu_seconds_total)
    t0=$(metric dpud_net_throttled_periods_total); d0=$(dpud_cpu); m0=$(machine_busy)
    read -r c0 q0 <<< "$(reactor_sched)"; w0=$(now)
    case $run in
      storage) fio_run "$w/f.json"; st=$(fio_row "$w/f.json"); nt="-" ;;
      network) iperf_run "$w/i.json"; nt=$(iperf_row "$w/i.json"); st="-" ;;
      both) iperf_run "$w/i.json" & ip=$!; fio_run "$w/f.json"; wait $ip
            st=$(fio_row "$w/f.json"); nt=$(iperf_row "$w/i.json") ;;
    esac
    n1=$(metric dpud_net_cpu_seconds_total); s1=$(metric dpud_storage_cpu_seconds_total)
    t1=$(metric dpud_net_throttled_periods_total); d1=$(dpud_cpu); m1=$(machine_busy)
    read -r c1 q1 <<< "$(reactor_sched)"; w1=$(now)
    awk -v sh="$share" -v r="$run" -v st="$st" -v nt="$nt" -v n0="$n0" -v n1="$n1" \
      -v s0="$s0" -v s1="$s1" -v t0="$t0" -v t1="$t1" -v d0="$d0" -v d1="$d1" \
      -v m0="$m0" -v m1="$m1" -v c0="$c0" -v c1="$c1" -v q0="$q0" -v q1="$q1" \
      -v w0="$w0" -v w1="$w1" 'BEGIN { n = n1 - n0; s = s1 - s0; w = w1 - w0
        rt = w - (q1 - q0)
        printf "| %s | %s | %s | %s | %.1f | %.2f | %.2f | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %.2f | %.2f | %d |\n",
          sh, r, st, nt, w, n, s, (n + s > 0 ? 100 * n / (n + s) : 0), 100 * n / w,
          100 * (c1 - c0 + q1 - q0) / w, 100 * n / rt, 100 * s / rt, d1 - d0, m1 - m0, t1 - t0 }'
  done
  kill "$dpid"; wait "$dpid" 2>/dev/null || true; dpid=""
done
