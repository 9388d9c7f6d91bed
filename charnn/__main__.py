"""``python -m charnn`` (and ``torchrun -m charnn train ...``) runs the command line."""

from .cli import main

if __name__ == "__main__":
    main()
