# session 17 diagnostic: log every garbage collection of this process that takes > 0.3 ms
import gc, os, time
_path = os.environ.get("GCLOG_DIR")
if _path:
    _start = [0.0]
    _f = None
    def _cb(phase, info):
        global _f
        if phase == "start":
            _start[0] = time.monotonic()
        else:
            d = time.monotonic() - _start[0]
            if d > 3e-4:
                if _f is None:
                    _f = open(os.path.join(_path, f"gc-{os.getpid()}.log"), "a", buffering=1)
                _f.write(f"{_start[0]:.6f} {d*1e3:.3f} {info.get('generation')} {info.get('collected')}\n")
    gc.callbacks.append(_cb)
