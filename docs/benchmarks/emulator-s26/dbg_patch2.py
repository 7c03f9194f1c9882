import re
import sys

p = sys.argv[1] + "/src/inferplane/twin/emulator/endpoint.py"
s = open(p).read()
def sub(pat, repl):
    global s
    s2, n = re.subn(pat, repl, s, flags=re.M)
    assert n == 1, pat
    s = s2
sub(r"^( +)reached = fe\.intake\(reached\)\n",
    r"\1self._dbg_bad += reached < self._dbg_fe; self._dbg_fe = max(self._dbg_fe, reached)\n\1reached = fe.intake(reached)\n")
sub(r"^( +)reached = fe\.handoff\(reached\)\n",
    r"\1self._dbg_ho += 1; self._dbg_hobad += reached < self._dbg_fe; self._dbg_fe = max(self._dbg_fe, reached)\n\1reached = fe.handoff(reached)\n")
sub(r"^( +)at = self\.frontend\.emit\(step_end, len\(out\.new_tokens\)\)\n",
    r"\1self._dbg_bad += step_end < self._dbg_fe; self._dbg_fe = max(self._dbg_fe, step_end)\n\1at = self.frontend.emit(step_end, len(out.new_tokens))\n")
sub(r"^(        self\._dbg_miss = 0\n)",
    r"\1        self._dbg_fe = -1.0; self._dbg_bad = 0; self._dbg_ho = 0; self._dbg_hobad = 0\n")
sub(r'f"max=\{late\[-1\]\*1e3:.3f\} early=\{sum\(x < 0 for x in late\)\}",',
    r'f"max={late[-1]*1e3:.3f} early={sum(x < 0 for x in late)} "'
    r' f"fe_out_of_order(intake/emit)={self._dbg_bad} handoffs={self._dbg_ho} handoff_out_of_order={self._dbg_hobad}",')
open(p, "w").write(s)
