"""`python -m medgan` runs the CLI (also what torchrun launches: `torchrun ... -m medgan train ...`)."""

from medgan.cli import main

if __name__ == "__main__":
    main()
