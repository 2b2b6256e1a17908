"""`python -m adafocus ...` = the `adafocus` command (for hosts where console scripts are not on PATH)."""

from adafocus.cli import main

main()
