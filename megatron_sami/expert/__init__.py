"""Expert iteration: constitutions, queries, generation, filtering, the iteration driver, MI evaluation."""
