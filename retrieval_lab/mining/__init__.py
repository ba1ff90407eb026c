"""Mining hard negatives from a first-stage ranking (BM25 or dense)."""
