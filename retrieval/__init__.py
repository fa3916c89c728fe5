"""Retrieval: models that learn user and item embeddings, served from a FAISS index.

``retrieve(user_ids, k) -> (item_ids, scores)`` is the one contract (see :mod:`retrieval.base`).
Modules: ``index`` (the FAISS wrapper), ``base`` (the contract and the embedding retriever),
``popularity`` and ``cf`` (baselines), ``covisit`` (co-visitation counts) and ``covisit_retriever`` (the
retriever over them, exact sparse scoring, no index), ``two_tower`` (towers: ``towers``, ``losses``, ``trainer``),
``hybrid`` (fusion), ``registry`` (every model by name: ``RetrieverSpec``, ``register``,
``load_retriever``), ``fitting`` (``fit_retriever``: tune on validation, serve a stage), ``tuning`` (the
grid and the seeded random search), ``evaluate`` (protocol metrics).
"""
