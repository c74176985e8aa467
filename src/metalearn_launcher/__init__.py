"""The ``metalearn`` command's entry point, outside the ``metalearn`` package: importing
anything inside it first imports the package, and with it torch (seconds), where a Ctrl-C
would end in a ``KeyboardInterrupt`` traceback. Here the interrupt is one line and exit 130,
and so is a process too small to load torch (exit 2)."""

import sys


def main() -> None:
    try:
        from metalearn.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting\n")
        raise SystemExit(130) from None
    except MemoryError:
        _too_small()
    except ImportError as err:
        if "failed to map segment" in str(err):  # the dynamic loader's word for a shared library that does not fit
            _too_small()
        if sys.platform != "win32":  # a broken install: the traceback says which module
            raise
        sys.stderr.write(f"error: {err}\n")  # the package's own line: which systems it runs on
        raise SystemExit(2) from None
    run(whole_process=True)


def _too_small() -> None:
    """Exit 2 with one line, for a process whose memory cannot hold torch's libraries: on the
    systems that limit it, the address-space limit (``ulimit -v``) is named with its value."""
    limit = ""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limit = f": this process's address space is limited to {soft / 2**20:.0f} MiB (ulimit -v); raise the limit"
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        pass
    sys.stderr.write(f"error: not enough memory to load torch{limit}\n")
    raise SystemExit(2) from None
