"""`python -m aqlm_compile ...` (what torchrun starts for `quantize --nproc`): the `aqlm-compile` command line."""

from .cli import main

if __name__ == "__main__":
    main()
