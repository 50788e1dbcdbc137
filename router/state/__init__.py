"""Shared state: the only package that talks to Redis (``redis``, ``hiredis``, ``fakeredis``
are imported here and nowhere else in ``router``). The store and its scripts (``store``,
``lua/``), the pipelined script connection (``muxredis``), every key name (``keys``), the
health side (``health``) and the cluster read model (``cluster``).

Imports only the top-level modules (config, errors, strategies); healthd uses it too.
"""
