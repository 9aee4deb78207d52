"""The SAMI objective, its data, and its training step (see ../shared/notes/sami-method.md)."""
