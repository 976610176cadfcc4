"""The `nemesis` command line: argument parsing and wiring only; the work is done by the libraries."""
