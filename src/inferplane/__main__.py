"""``python -m inferplane``: the same command line as the ``inferplane`` script."""

from inferplane.cli import main

if __name__ == "__main__":
    main()
