"""`python -m protoclip_cli ...` (this is how torchrun launches `train`)."""

from protoclip_cli.cli import main

if __name__ == "__main__":
    main()
