"""``python -m faar_serve``: the gateway, as ``faar-serve``."""

from .cli import main

main()
