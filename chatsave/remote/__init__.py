"""Remotes: the backends chatsave talks to, behind one interface (see base.py)."""
