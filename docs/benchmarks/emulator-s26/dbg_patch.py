import sys

p = sys.argv[1] + "/src/inferplane/twin/emulator/endpoint.py"
s = open(p).read()
def rep(a, b):
    global s
    assert s.count(a) == 1, a
    s = s.replace(a, b)
rep('''        now = self.now()
        arrival = now if at is None or at > now else at
''', '''        now = self.now()
        arrival = now if at is None or at > now else at
        if at is not None:
            self._dbg_late.append(now - at)
            self._dbg_miss += arrival < self._dbg_last_start
''')
rep('''            out = engine.step(start)
''', '''            self._dbg_last_start = start
            out = engine.step(start)
''')
rep('''        self._subs: dict[str, Submission] = {}
''', '''        self._subs: dict[str, Submission] = {}
        self._dbg_late: list[float] = []
        self._dbg_miss = 0
        self._dbg_last_start = -1.0
''')
rep('''        """Stop the driver, release every waiting handler, close the publisher."""
''', '''        """Stop the driver, release every waiting handler, close the publisher."""
        import statistics, sys
        late = sorted(self._dbg_late)
        if late:
            q = statistics.quantiles(late, n=10)
            print(f"DBG n={len(late)} missed={self._dbg_miss} late_ms min={late[0]*1e3:.3f} "
                  f"p10={q[0]*1e3:.3f} p50={q[4]*1e3:.3f} p90={q[8]*1e3:.3f} "
                  f"max={late[-1]*1e3:.3f} early={sum(x < 0 for x in late)}",
                  file=sys.stderr, flush=True)
''')
open(p, "w").write(s)
