"""Finding and describing subgraphs. Matchers here return typed descriptions and never edit a graph.

* :mod:`.ops` - one vocabulary for the many spellings of an op;
* :mod:`.graph` - module paths, placeholders, ancestry;
* :mod:`.products` - every batched matrix product as an einsum-like description;
* :mod:`.attention` - ``softmax(f(Q·Kᵀ))·V`` sites;
* :mod:`.masks` - what the ops between scores and softmax amount to.
"""
