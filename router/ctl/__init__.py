"""Operator tooling, the ``routerctl`` command: its commands (``cli``), ``routerctl up``
(``up``) and the state tables (``tables``). The only part of ``router`` that may import
``loadtest`` or start ``healthd``; nothing else in ``router`` imports it.
"""
