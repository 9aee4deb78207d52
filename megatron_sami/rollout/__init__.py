"""The rollout stage: constitutions, queries, response generation, filters and the principle
writer. Its output is the records file one SAMI training phase reads.
"""
