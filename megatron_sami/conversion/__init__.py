"""HF <-> Megatron-Core checkpoint conversion for the Llama family (Llama, Mistral, Mixtral)."""
