"""Beyond one process: choral engines as Ray Serve replicas behind one OpenAI-compatible endpoint,
with prefix-aware routing (docs/scale-out.md).

Importing this package does not import Ray; the modules that do (``ray_serve``, ``replica``,
``ingress``, ``router``) are imported only by ``choral serve --replicas N`` and by users of
:func:`choral.scale.ray_serve.build_app`. Ray is the optional extra ``pip install choral[ray]``.

The plain-Python parts, tested without Ray: ``config`` (what a deployment is made of),
``prompt_hashes`` (a request's prompt as the replicas' prefix cache hashes it), ``kv_index``
(a replica's cached blocks, kept from its KV events), ``routing_policy`` (which replica a request
goes to), ``prefix_index`` (what the router believes each replica caches), ``asgi_call`` (one HTTP
request through an in-process ASGI app, streamed) and ``metrics_merge`` (every replica's
``/metrics`` in one exposition, with a ``replica`` label).
"""
