"""Retrieval: dense encoding and faiss search, BM25, metrics, TREC run files."""
