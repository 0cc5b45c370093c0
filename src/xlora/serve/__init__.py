"""The OpenAI-compatible server: thin routes over one service, a continuous batcher, metrics.

Needs the ``serve`` extra (``pip install xlora[serve]``).
"""
