"""Ranking: the BERT cross-encoder reranker of the second stage, in two variants behind one contract.

The **item-token** variant (the default) reads one token per item: ``item_config`` (its typed configs),
``item_model`` (item inputs, a BERT-family encoder run in split history/candidate form, the head),
``item_ranker`` (:class:`~ranking.item_ranker.ItemTokenRanker`: ``predict``/``rank``, history cache, new
items, save/load, fp32/int8 backends), ``item_lists`` (lists over every training position with per-prefix
hard negatives), ``item_trainer`` (training, LoRA, distillation, the validation-fitted hybrid head);
``loading.load_ranker`` loads either variant from its folder.

The **title** variant reads words of item titles. Its modules: ``config`` (typed configs), ``text``
(item/history text and the pre-tokenized word-token cache), ``inputs`` (pairwise rows, one-pass blocks, packed block-mask sequences), ``encoder`` (the model: a BERT
encoder plus a scoring head, pairwise and one-pass shared-history modes, history keys/values),
``backends`` (what runs the tensors, behind one interface), ``scoring`` (batched list scoring),
``cross_encoder`` (:class:`CrossEncoderRanker`: ``predict``/``rank``, history cache, save/load),
``data`` (training and validation lists from retrieval candidates), ``trainer`` (LoRA/AdaLoRA fine-tuning,
listwise loss, early stopping, merging), ``residual`` (leak-free lists for the residual objective: the
cross-encoder learns a correction of the retrieval order), ``blend`` (the hybrid score fitted on validation) and
``testing`` (tiny random models for tests).
"""
