"""The command line: one module per command (``add_arguments`` + ``run``). Only this package maps errors to
exit codes, prints, and reads the process environment."""
