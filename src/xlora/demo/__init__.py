"""The embedded demo: SmolLM2-135M-Instruct mixed over protein/chemistry/mathematics/general experts,
its domains and data generators, evaluation, retraining, and the tiny in-process example.
"""
