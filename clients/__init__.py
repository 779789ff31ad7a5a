"""Clients of the gateway and of Triton, for users and for ``bench``: run as
``python -m clients.<name>`` from the repository root, or as scripts (``python
clients/predict.py``): they import only third-party packages."""
