"""Test support: the multi-process harness, tiny HF models, a plain LM objective and the foundation
smoke job. Shipped in the package so that users can run the invariance tests on their own cluster.
"""
