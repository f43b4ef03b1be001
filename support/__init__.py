"""The machinery around some_define.py's book pieces, one module per concern; the scripts import from here."""
