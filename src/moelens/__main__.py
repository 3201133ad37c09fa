"""``python -m moelens``: the command line, as the ``moelens`` script runs it."""

from moelens.cli import main

if __name__ == "__main__":
    main()
