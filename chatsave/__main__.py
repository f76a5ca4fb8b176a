"""``python -m chatsave``."""

from chatsave.cli import main

main()
