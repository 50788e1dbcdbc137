"""Talking to providers: the HTTP/1.1 client (``client``) and one adapter module per
provider kind (``providers``), each with its request and answer translation, probe and
default completion budget.

Imports only the top-level modules.
"""
