"""Session 19: a synthetic noisy neighbour for the fidelity test — busy stretches of 50-400 ms
(a busy loop) every 0.5-2.5 s, on the CPU it is pinned to (run with `taskset -c 0`: the real
vLLM's engine core), a seeded random pattern (~13 % of one CPU on average).

    taskset -c 0 python docs/benchmarks/calibration-s19/noise.py SEED
"""
import random
import sys
import time

rng = random.Random(int(sys.argv[1]))
while True:
    end = time.monotonic() + rng.uniform(0.05, 0.4)
    while time.monotonic() < end:
        pass
    time.sleep(rng.uniform(0.5, 2.5))
