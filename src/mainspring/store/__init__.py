"""Persistence: the Store contract and one implementation per backend."""
