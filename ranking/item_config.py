"""Typed configs of the item-token reranker (:mod:`ranking.item_model`, :mod:`ranking.item_trainer`).

In this reranker a *token is an item*: every history item and every candidate enters the BERT-family
encoder as one input vector. Each config is a :class:`~data.config.JsonConfig` dataclass (JSON
round-trip, unknown keys rejected) and validates itself with :class:`~data.errors.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.config import JsonConfig, require
from ranking.config import BUNDLED_MINILM, DEFAULT_TARGETS, PEFT_METHODS, _positive_ints

#: Encoders of the item-token model: a narrow BERT stack trained from scratch, or the bundled MiniLM's first
#: layers (pretrained, adapted with LoRA).
ENCODERS = ("narrow", "minilm")


@dataclass
class ItemTokenConfig(JsonConfig):
    """The item-token cross-encoder: what an item token holds, the encoder and the head.

    An item's input vector is the sum of a projected learned id embedding (zero for an item with no id
    history, so it is placed by content alone), a projection of its frozen MiniLM text embedding
    (``"title | genres"``), a projection of its genres multi-hot and a release-year bucket embedding. The
    encoder's own embedding block then adds a position (history: recency, 0 = most recent; candidates: one
    shared slot, so scores do not depend on candidate order) and a token type (history 0, candidate 1),
    LayerNorm and dropout. History tokens attend to the history; each candidate attends to the history and
    to itself, never to another candidate.

    Attributes:
        encoder: ``"narrow"`` (a BERT encoder of ``hidden``/``layers``/``heads``/``ffn`` trained from
            scratch) or ``"minilm"`` (the first ``layers`` layers of ``base_model``, a pretrained BERT-family
            folder; ``hidden``/``heads``/``ffn`` then come from it).
        base_model: ``"bundled-minilm"`` or a local Hugging Face BERT folder (``encoder="minilm"`` only).
        hidden: width of the narrow encoder.
        layers: encoder layers (narrow: built; minilm: the first ``layers`` of the pretrained stack).
        heads: attention heads of the narrow encoder (must divide ``hidden``).
        ffn: feed-forward width of the narrow encoder.
        dropout: hidden and attention dropout of the narrow encoder (a MiniLM keeps its own).
        norm: layer order: ``"post"`` (BERT's own: ``LN(x + sublayer(x))``; pretrained MiniLM layers need
            it) or ``"pre"`` (``x + sublayer(LN x)`` with the same modules and a final LayerNorm; trains
            from scratch more easily).
        max_history: most recent history items read (N).
        id_dim: width of the learned item-id embedding (initialised from the retriever's item vectors when
            their width matches, else projected to it by PCA).
        use_ids: give tokens the learned id embedding.
        use_text: give tokens the frozen MiniLM text embedding of ``"title | genres"``.
        use_genres: give tokens the genres multi-hot.
        use_year: give tokens the release-year bucket.
        year_bucket_years: width of a year bucket, in years.
        id_dropout: probability, per token and training step, of dropping the id embedding so content
            alone must place the item (trains the path new items take).
        head_hidden: hidden width of the head's MLP over the candidate's final state.
        text_model: the text encoder of the item text embedding (``"bundled-minilm"`` or a local folder).
        text_cache_dir: folder caching text embeddings; ``None``: ``$SHORTLIST_CACHE_DIR`` or
            ``~/.cache/shortlist``; ``""`` disables the cache.
        kv_cache_users: users whose history keys/values are kept (LRU) between requests; 0 disables.
        batch_size: lists per forward pass in batched (offline) scoring.
        threads: ``torch.set_num_threads`` while scoring; 0 leaves torch's setting alone.
    """

    encoder: str = "narrow"
    base_model: str = BUNDLED_MINILM
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn: int = 256
    dropout: float = 0.1
    norm: str = "post"
    max_history: int = 100
    id_dim: int = 64
    use_ids: bool = True
    use_text: bool = True
    use_genres: bool = True
    use_year: bool = True
    year_bucket_years: int = 5
    id_dropout: float = 0.1
    head_hidden: int = 64
    text_model: str = BUNDLED_MINILM
    text_cache_dir: str | None = None
    kv_cache_users: int = 1024
    batch_size: int = 64
    threads: int = 0

    def __post_init__(self) -> None:
        require(self.encoder in ENCODERS, f"ItemTokenConfig.encoder must be one of {list(ENCODERS)}, "
                                          f"got {self.encoder!r}")
        _positive_ints(self, ("hidden", "layers", "heads", "ffn", "max_history", "id_dim", "year_bucket_years",
                         "head_hidden", "batch_size"))
        require(self.hidden % self.heads == 0,
                f"ItemTokenConfig.heads={self.heads} must divide hidden={self.hidden}")
        require(0 <= self.dropout < 1 and 0 <= self.id_dropout < 1,
                "ItemTokenConfig.dropout and id_dropout must be in [0, 1)")
        require(self.use_ids or self.use_text or self.use_genres or self.use_year,
                "ItemTokenConfig: at least one of use_ids, use_text, use_genres, use_year must be on")
        require(self.norm in ("post", "pre"), f"ItemTokenConfig.norm must be 'post' or 'pre', got {self.norm!r}")
        require(self.encoder == "narrow" or self.norm == "post",
                "ItemTokenConfig.norm='pre' is for the narrow encoder; pretrained MiniLM layers are post-LN")
        require(self.kv_cache_users >= 0 and self.threads >= 0,
                "ItemTokenConfig.kv_cache_users and threads must be >= 0")
        require(isinstance(self.base_model, str) and self.base_model != "",
                "ItemTokenConfig.base_model must name 'bundled-minilm' or a local Hugging Face folder")


@dataclass
class ItemTrainerConfig(JsonConfig):
    """Training the item-token reranker over every training position (see :mod:`ranking.item_trainer`).

    A training list is one position ``t`` of a user's training sequence: the items before it as history,
    item ``t`` as the positive, ``n_hard`` negatives drawn from the retriever's top ``hard_pool`` for that
    prefix and ``n_uniform`` from the catalogue (never one of the user's own items). The loss is the softmax
    of the positive against its negatives; with a teacher (distillation) a listwise KL to the teacher's
    scores is added.

    Attributes:
        max_steps: optimizer steps (the cosine schedule spans them).
        batch_size: lists per step.
        n_hard: hard negatives per list.
        n_uniform: uniform negatives per list.
        hard_pool: retrieval depth hard negatives are drawn from (per prefix).
        hard_horizon: a position draws hard negatives only when the user has at least this many later events
            in the training data (so a hard negative is an item not taken over that horizon); closer to the
            end of the training window its negatives are all uniform. Without it, the items a user takes
            right after the window (unknown at training time) become hard negatives of the histories most
            like the one served next (see :mod:`ranking.item_lists`).
        min_history: fewest history items a training position needs.
        learning_rate: AdamW learning rate of everything trained in full (a narrow encoder, the item inputs,
            the head).
        adapter_learning_rate: AdamW learning rate of LoRA adapters (``peft`` set).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps, then cosine decay to 0 at ``max_steps``.
        grad_clip: gradient-norm clip; 0 disables.
        peft: ``""`` trains the encoder in full; ``"lora"``/``"adalora"`` freezes it and adapts its
            projections through peft (the MiniLM encoder's default).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on the LoRA input.
        target_modules: projections adapted in every encoder layer.
        eval_every: steps between validation evaluations.
        val_candidates: retrieval depth reranked during validation (M).
        patience: evaluations without a better validation NDCG@10 before stopping; 0 never stops early.
        distill_weight: weight of the listwise KL to the teacher's scores (distillation only).
        distill_temperature: softmax temperature of the teacher and student scores in the KL.
        seed: seeds weights, sampling and dropout.
        threads: ``torch.set_num_threads`` while training.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        progress: tqdm progress bars.
    """

    max_steps: int = 2000
    batch_size: int = 64
    n_hard: int = 32
    n_uniform: int = 16
    hard_pool: int = 64
    hard_horizon: int = 30
    min_history: int = 1
    learning_rate: float = 2e-3
    adapter_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    peft: str = ""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    eval_every: int = 250
    val_candidates: int = 50
    patience: int = 0
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        _positive_ints(self, ("max_steps", "batch_size", "hard_pool", "min_history", "lora_r", "lora_alpha",
                         "eval_every", "val_candidates", "threads"))
        require(self.hard_horizon >= 0, f"ItemTrainerConfig.hard_horizon must be >= 0, got {self.hard_horizon}")
        require(self.n_hard >= 0 and self.n_uniform >= 0 and self.n_hard + self.n_uniform >= 1,
                "ItemTrainerConfig.n_hard and n_uniform must be >= 0 with at least one negative in all")
        require(self.peft in ("", *PEFT_METHODS),
                f"ItemTrainerConfig.peft must be '' or one of {list(PEFT_METHODS)}, got {self.peft!r}")
        require(self.learning_rate > 0 and self.adapter_learning_rate > 0,
                "ItemTrainerConfig.learning_rate and adapter_learning_rate must be > 0")
        require(self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup_steps >= 0 and self.patience >= 0,
                "ItemTrainerConfig.weight_decay, grad_clip, warmup_steps and patience must be >= 0")
        require(0 <= self.lora_dropout < 1, "ItemTrainerConfig.lora_dropout must be in [0, 1)")
        require(self.distill_weight >= 0 and self.distill_temperature > 0,
                "ItemTrainerConfig.distill_weight must be >= 0 and distill_temperature > 0")
        require(len(self.target_modules) > 0, "ItemTrainerConfig.target_modules must name a projection")
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                f"ItemTrainerConfig.device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}")


__all__ = ["ENCODERS", "ItemTokenConfig", "ItemTrainerConfig"]
