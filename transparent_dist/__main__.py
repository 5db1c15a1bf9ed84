"""`python -m transparent_dist`: the command line (`runtime.cli`)."""

from transparent_dist.runtime.cli import main

main()
