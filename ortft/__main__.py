"""Run the CLI as `python -m ortft`."""

from .cli import main

if __name__ == "__main__":
    main()
