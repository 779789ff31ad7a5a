"""The gateway's routers, one per audience; ``app.create_app`` includes them.

* ``inference``: ``/v1`` (predict, batch, model), behind the optional API key;
* ``operations``: ``/healthz``, ``/readyz``, ``/metrics`` for orchestrators and Prometheus;
* ``web``: the page at ``/`` and its ``/static`` files, public.
"""
