"""The ``muse`` command line: typer apps that parse flags and render with rich.

Every decision lives in a library function; these modules only translate
flags into calls and results into tables. Heavy imports (the store, torch)
happen inside commands so ``muse --help`` starts fast.
"""
