"""Cumulo: an open AI cloud for the chips you can buy."""

__version__ = "0.1.0"
