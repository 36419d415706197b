"""``python -m ftlab.cli`` (what ``torchrun -m ftlab.cli`` runs)."""

from ftlab.cli import main

main()
