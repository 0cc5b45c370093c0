"""The embedded demo: SmolLM2-135M-Instruct mixed over seven science experts (the science suite: protein,
mechanics, chemistry, quantum, mathematics, general, graph) and the earlier five-domain assets, their data
generators and physics checks, evaluation, retraining, and the tiny in-process example.
"""
