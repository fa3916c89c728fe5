"""Ranking: the BERT cross-encoder reranker of the second stage.

Modules: ``config`` (typed configs), ``text`` (item/history text and the pre-tokenized item-token cache),
``inputs`` (pairwise rows, one-pass blocks, packed block-mask sequences), ``encoder`` (the model: a BERT
encoder plus a scoring head, pairwise and one-pass shared-history modes, history keys/values),
``backends`` (what runs the tensors, behind one interface), ``scoring`` (batched list scoring),
``cross_encoder`` (:class:`CrossEncoderRanker`: ``predict``/``rank``, history cache, save/load),
``data`` (training and validation lists from retrieval candidates), ``trainer`` (LoRA/AdaLoRA fine-tuning,
listwise loss, early stopping, merging), ``residual`` (leak-free lists for the residual objective: the
cross-encoder learns a correction of the retrieval order), ``blend`` (the hybrid score fitted on validation) and
``testing`` (tiny random models for tests).
"""
