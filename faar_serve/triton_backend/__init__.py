"""Files that ``faar_serve.triton_local`` copies into a Triton backend directory (not imported here)."""
