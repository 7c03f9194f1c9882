"""Each gateway thread's CPU time, run-queue wait and time slices between the first and the
last sample of gateway-threads.log, written by gateway_threads.sh during a real_engines.py run:
`python gateway_threads.py gateway-threads.log`."""
import collections
import sys
first, last = {}, {}
for line in open(sys.argv[1] if len(sys.argv) > 1 else 'gateway-threads.log'):
    p = line.split()
    if len(p) < 7: continue
    ts, pid, tid, comm, cpu, wait, slices = p[:7]
    k = (pid, tid, comm)
    v = (int(ts), int(cpu), int(wait), int(slices))
    first.setdefault(k, v); last[k] = v
bypid = collections.defaultdict(list)
for k in first:
    a, b = first[k], last[k]
    bypid[k[0]].append((k[2], k[1], b[0]-a[0], (b[1]-a[1])/1e9, (b[2]-a[2])/1e9, b[3]-a[3]))
for pid, rows in bypid.items():
    print("pid", pid)
    for r in sorted(rows, key=lambda r: -r[3]):
        print(f"  {r[0]:14s} tid {r[1]:>6s} span {r[2]:4d}s cpu {r[3]:6.3f}s wait {r[4]:6.3f}s slices {r[5]:7d}  wait/slice {1e3*r[4]/max(r[5],1):.2f} ms")
