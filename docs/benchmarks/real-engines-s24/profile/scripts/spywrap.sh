#!/bin/bash
# prof24: run the gateway under py-spy (attached 3 s after start, own session so the bench's
# process-group SIGTERM does not kill the samplers; they stop and write when the gateway exits).
# A: CPU profile (idle samples left out), raw collapsed stacks; B: timeline (idle kept), speedscope.
case " $* " in
  *" serve "*)
    ( sleep 3; exec setsid /work/main/.venv/bin/py-spy record --pid $$ --rate 500 --nonblocking \
        --threads --format raw -o /tmp/prof24prof/gw-$$.raw.txt ) \
        >/tmp/prof24prof/spyA-$$.log 2>&1 &
    ( sleep 3; exec setsid /work/main/.venv/bin/py-spy record --pid $$ --rate 250 --nonblocking \
        --threads --idle --format speedscope -o /tmp/prof24prof/gw-$$.speedscope.json ) \
        >/tmp/prof24prof/spyB-$$.log 2>&1 &
    ;;
esac
exec /work/main/.venv/bin/python "$@"
