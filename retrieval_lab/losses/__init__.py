"""Losses, one per file. Each takes query embeddings ``q`` (B x D) and document embeddings ``d`` (B*G x D)
laid out in groups of G (positive first), and returns a scalar."""
