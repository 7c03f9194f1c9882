"""Offline (session 16, engineer calib): the front end alone, session 15's E3 case: a request
(intake s, wait w, hand-off h) sent alone, and with three more sent 2.7 ms after it; when it
reaches the engine. ``old`` for the first-come-first-served FrontEnd (git 99b2192, floats),
``new`` for the processor-sharing one (jobs). Arguments: LABEL,s_ms,h_ms,w_ms ...

    cd CHECKOUT && PYTHONPATH=src python docs/benchmarks/calibration-s16/handoff_e3.py new x,1.61,0,4.82
"""
import sys
from inferplane.physics.frontend import FrontEnd
def run(s, h, w, follow_at=0.0027, n=3, new=True):
    fe = FrontEnd(s, 0.0, h)
    if new:
        a = fe.intake(0.0)
        fe.advance(follow_at)
        if a.end is None or a.end + w > follow_at:
            fs = [fe.intake(follow_at) for _ in range(n)]
        # A's hand-off after its wait
        while a.end is None: fe.advance(fe.end_of(a))
        b = fe.handoff(a.end + w)
        while b.end is None: fe.advance(fe.end_of(b))
        return b.end
    else:
        t = fe.intake(0.0)
        fs = [fe.intake(follow_at) for _ in range(n)]
        return fe.handoff(t + w)
for label, s, h, w in [(l, float(a)/1e3, float(b)/1e3, float(c)/1e3) for l, a, b, c in (x.split(',') for x in sys.argv[2:])]:
    new = sys.argv[1] == 'new'
    alone = run(s, h, w, n=0, new=new); withf = run(s, h, w, new=new)
    print(sys.argv[1], label, 'alone %.2f ms, 3 followers 2.7 ms later %.2f ms: +%.2f' % (alone*1e3, withf*1e3, (withf-alone)*1e3))
