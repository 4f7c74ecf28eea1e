"""Peer engines run as standalone scripts (own venvs, no sarathi imports) for comparisons."""
