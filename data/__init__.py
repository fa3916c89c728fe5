"""Data: loaders, validation, id vocabularies, the evaluation protocol, metrics and synthetic data.

Modules: ``errors`` (every domain exception), ``config`` (typed JSON configs), ``io`` (atomic writes,
manifests), ``vocab`` (external ids <-> rows), ``dataset`` (the ``Interactions`` container), ``validate``,
``items`` (the item table), ``movielens`` and ``generic`` (loaders), ``datasets`` (either, by name or
spec: ``load_dataset``), ``protocol`` (filters and splits),
``metrics`` (Recall/NDCG/MRR/Coverage with bootstrap intervals) and ``synthetic`` (the generator).
"""
