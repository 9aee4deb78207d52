"""The evaluation stage: mutual information of a model's responses with their constitutions, and
win rates against a baseline judged by an LLM (the judge client and the pairwise protocol).
"""
