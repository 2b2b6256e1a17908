"""`python -m adafocus ...` = the `adafocus` command (for hosts where console scripts are not on PATH)."""

from adafocus.cli import main

# only when run: importing this module (pydoc, documentation tools, a module walk) must not parse that
# process's own argv as a command line and exit
if __name__ == "__main__":
    main(prog_name="python -m adafocus")
