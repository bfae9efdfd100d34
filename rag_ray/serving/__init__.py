"""Online serving with Ray Serve: an HTTP ingress, autoscaled model replicas with dynamic batching,
and one index host that owns the current index version's shard actors and swaps versions.

``app.py`` builds the application (the ``rag-ray serve`` command and ``serve run cluster/serve.yaml``
deploy the same one), ``api.py`` holds the HTTP schemas, ``model_server.py`` the replicas,
``index_host.py`` the index owner, ``static/`` the web page.
"""
