"""Retrieval: models that learn user and item embeddings, served from a FAISS index.

``retrieve(user_ids, k) -> (item_ids, scores)`` is the one contract (see :mod:`retrieval.base`).
Modules: ``index`` (the FAISS wrapper), ``base`` (the contract and the embedding retriever),
``popularity`` and ``cf`` (baselines), ``registry`` (by name, and ``load_retriever``), ``evaluate``
(protocol metrics) and ``tuning`` (validation grid search).
"""
