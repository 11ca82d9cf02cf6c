"""Run `aqlm-compile ARGS...` and kill -9 this process right after its N-th file write (KILL_AT_WRITE=N): every
`save_file`, `atomic_write_bytes` and `os.replace` of the quantizer counts, so N lands between any two files of a
save. Used by tests/quantize/test_kill_resume.py; not part of the product."""

import os
import signal
import sys


def main() -> None:
    target = int(os.environ["KILL_AT_WRITE"])
    count = {"n": 0}

    import atexit

    import aqlm_compile.cache as cache
    import aqlm_compile.format as fmt

    def counted(fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            count["n"] += 1
            if count["n"] == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    fmt.save_file = counted(fmt.save_file)
    fmt.atomic_write_bytes = counted(fmt.atomic_write_bytes)
    cache.os.replace = counted(os.replace)  # the same os module everywhere: every rename counts

    atexit.register(lambda: print(f"kill_at_write: {count['n']} writes", file=sys.stderr))
    from aqlm_compile.cli import main as cli

    sys.argv = ["aqlm-compile", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
