#!/bin/bash
# While bench/peers/real_engines.py runs: every 10 s, each thread of every inferplane gateway
# process: epoch seconds, pid, tid, thread name, then /proc/.../schedstat (ns on a CPU, ns
# waiting on a run queue, time slices). Read it with gateway_threads.py.
out=${1:-gateway-threads.log}; : > "$out"
while pgrep -f "bench/peers/real_[e]ngines" >/dev/null; do
  for pid in $(pgrep -f "inferplane.cli serve"); do
    for t in /proc/$pid/task/*; do
      echo "$(date +%s) $pid $(basename $t) $(tr ' ' _ < $t/comm 2>/dev/null) $(cat $t/schedstat 2>/dev/null)"
    done
  done >> "$out"
  sleep 10
done
