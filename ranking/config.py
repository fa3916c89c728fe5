"""Typed configs of the reranker: its text, its model, its training and its hybrid blend.

Each config is a :class:`~data.config.JsonConfig` dataclass (JSON round-trip, unknown keys rejected) and
validates itself with :class:`~data.errors.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data.config import JsonConfig, require
from retrieval.item_features import BUNDLED_MINILM  # "bundled-minilm": the bundled all-MiniLM-L6-v2

#: The two scoring modes.
MODES = ("pairwise", "one_pass")
#: The PEFT methods the trainer knows.
PEFT_METHODS = ("lora", "adalora")
#: The projections LoRA adapts in every encoder layer (attention q/k/v and output, feed-forward in/out).
DEFAULT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def _positive_ints(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{type(obj).__name__}.{name} must be an integer >= 1, got {value!r}")


@dataclass
class TextConfig(JsonConfig):
    """How item ids become token ids.

    Every item's text (``"Title (1995) | Adventure, Animation"``: title, year and genres) is tokenized
    once; a request only concatenates cached token ids.

    Attributes:
        history_items: most recent history items read (N), newest first.
        history_tokens: token budget of the history segment, ``[CLS]`` and ``[SEP]`` included; older items
            that do not fit whole are dropped.
        history_item_tokens: tokens kept per history item (its text is cut to this).
        item_tokens: tokens kept per candidate item (its text is cut to this; ``[SEP]`` not included).
        separator: the string between two history items (tokenized once).
    """

    history_items: int = 20
    history_tokens: int = 96
    history_item_tokens: int = 16
    item_tokens: int = 24
    separator: str = ";"

    def __post_init__(self) -> None:
        _positive_ints(self, ("history_items", "history_tokens", "history_item_tokens", "item_tokens"))
        require(self.history_tokens >= 3, "TextConfig.history_tokens must be >= 3 ([CLS], one token, [SEP])")


@dataclass
class RankerConfig(JsonConfig):
    """The cross-encoder: base model, scoring mode, head and serving.

    Attributes:
        base_model: ``"bundled-minilm"`` or a local Hugging Face BERT-family folder (BERT, MiniLM,
            RoBERTa-style layouts with ``encoder.layer[i].attention.self.query``).
        mode: ``"pairwise"`` (``[CLS] history [SEP] item [SEP]``, one sequence per candidate, full
            attention) or ``"one_pass"`` (the history once, then every candidate under a block mask, each
            scored from the mean of its own tokens).
        pairwise_pooling: what the pairwise mode scores from: ``"candidate_mean"`` (the mean of the item
            segment's final states, like the one-pass mode, so the two modes differ only in attention) or
            ``"cls"`` (the ``[CLS]`` state). MiniLM was pretrained with mean pooling; ``[CLS]`` learns
            slower.
        head_hidden: width of the scoring head's hidden layer; 0 gives a single linear layer.
        head_dropout: dropout before the scoring head (training only).
        text: how items become tokens.
        kv_cache_users: users whose history keys/values the one-pass mode keeps (LRU); 0 disables.
        batch_size: sequences per forward pass in batched (offline) scoring.
        bucket_size: pairwise mode: candidates per forward pass of one request, after sorting them by token
            length (rows of similar length pad little). The one-pass mode scores up to
            ``max(bucket_size, 256)`` candidates of one request in a single pass (one history, no copies).
        threads: ``torch.set_num_threads`` for scoring; 0 leaves torch's setting alone.
    """

    base_model: str = BUNDLED_MINILM
    mode: str = "one_pass"
    pairwise_pooling: str = "candidate_mean"
    head_hidden: int = 0
    head_dropout: float = 0.1
    text: TextConfig = field(default_factory=TextConfig)
    kv_cache_users: int = 1024
    batch_size: int = 64
    bucket_size: int = 16
    threads: int = 0

    def __post_init__(self) -> None:
        require(self.mode in MODES, f"RankerConfig.mode must be one of {list(MODES)}, got {self.mode!r}")
        require(self.pairwise_pooling in ("candidate_mean", "cls"),
                f"RankerConfig.pairwise_pooling must be 'candidate_mean' or 'cls', got {self.pairwise_pooling!r}")
        require(isinstance(self.head_hidden, int) and self.head_hidden >= 0,
                f"RankerConfig.head_hidden must be an integer >= 0, got {self.head_hidden!r}")
        require(0 <= self.head_dropout < 1, f"RankerConfig.head_dropout must be in [0, 1), got {self.head_dropout}")
        require(self.kv_cache_users >= 0, "RankerConfig.kv_cache_users must be >= 0")
        require(self.threads >= 0, "RankerConfig.threads must be >= 0")
        _positive_ints(self, ("batch_size", "bucket_size"))
        require(isinstance(self.base_model, str) and self.base_model != "",
                "RankerConfig.base_model must name 'bundled-minilm' or a local Hugging Face folder")


@dataclass
class TrainerConfig(JsonConfig):
    """Fine-tuning the cross-encoder on retrieval candidates (see :mod:`ranking.trainer`).

    Attributes:
        peft: ``"lora"`` (default) or ``"adalora"``; both go through peft's ``get_peft_model``.
        lora_r: LoRA rank (AdaLoRA: the initial rank).
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on the LoRA input.
        adalora_target_r: AdaLoRA's average target rank after pruning.
        target_modules: name suffixes of the adapted projections in every encoder layer.
        learning_rate: AdamW learning rate of the adapters.
        head_learning_rate: AdamW learning rate of the fully trained scoring head.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps of the learning rate.
        grad_clip: gradient-norm clip; 0 disables.
        batch_size: training lists (one positive and ``n_negatives`` negatives) per step.
        n_negatives: negatives per list.
        hard_fraction: share of negatives drawn from the retriever's top ``hard_pool`` (the rest uniform).
        hard_pool: how deep in each user's retrieval list hard negatives are drawn from.
        positions_per_user: training positions sampled per user and epoch, from any position of the
            user's sequence that has at least ``min_history`` items before it.
        min_history: fewest history items an example needs.
        position_weighting: how positions are drawn: ``"uniform"`` over the sequence, or ``"linear"``
            (position ``t`` with weight ``t``: every position can be drawn, recent ones more often, like the
            held-out items, which are each user's latest).
        max_users: users sampled for training (a subsample keeps CPU training short); 0 uses all.
        max_steps: most optimizer steps.
        eval_every: steps between validation evaluations.
        patience: evaluations without a better validation NDCG@10 before stopping.
        val_candidates: retrieval depth reranked during validation (M).
        val_users: validation users scored (0 = all); users whose target is outside the top M add 0 to
            NDCG@10 whatever the order, so only users with the target inside are run.
        eval_at_start: evaluate before the first step too, so early stopping can keep the starting
            weights (useful when warm-starting from another trained ranker).
        seed: seeds the head, the adapters, dropout and sampling.
        threads: ``torch.set_num_threads`` while training.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        progress: tqdm progress bars.
        objective: ``"listwise"`` (softmax of the positive against sampled negatives) or ``"residual"``
            (the cross-encoder score is added to a fixed retrieval-score offset, so it learns a correction
            of the retrieval order; lists and offsets come from a prefix retriever, see
            :mod:`ranking.residual`).
        residual_tail: residual objective only: positions per user, counted from the end of the training
            sequence, that become lists (the prefix retriever is fitted without them).
    """

    peft: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    adalora_target_r: int = 4
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    learning_rate: float = 2e-3
    head_learning_rate: float = 5e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    batch_size: int = 8
    n_negatives: int = 7
    hard_fraction: float = 0.75
    hard_pool: int = 100
    positions_per_user: int = 4
    min_history: int = 3
    position_weighting: str = "linear"
    max_users: int = 0
    max_steps: int = 300
    eval_every: int = 50
    patience: int = 3
    val_candidates: int = 20
    val_users: int = 0
    eval_at_start: bool = False
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    progress: bool = True
    objective: str = "listwise"
    residual_tail: int = 10

    def __post_init__(self) -> None:
        require(self.peft in PEFT_METHODS, f"TrainerConfig.peft must be one of {list(PEFT_METHODS)}, "
                                           f"got {self.peft!r}")
        _positive_ints(self, ("lora_r", "lora_alpha", "adalora_target_r", "batch_size", "n_negatives",
                              "hard_pool", "positions_per_user", "min_history", "max_steps", "eval_every",
                              "patience", "val_candidates", "threads"))
        require(self.objective in ("listwise", "residual"),
                f"TrainerConfig.objective must be 'listwise' or 'residual', got {self.objective!r}")
        require(self.residual_tail >= 1, f"TrainerConfig.residual_tail must be >= 1, got {self.residual_tail}")
        require(self.position_weighting in ("uniform", "linear"),
                f"TrainerConfig.position_weighting must be 'uniform' or 'linear', got {self.position_weighting!r}")
        require(len(self.target_modules) > 0, "TrainerConfig.target_modules must name at least one projection")
        require(0 <= self.hard_fraction <= 1, f"TrainerConfig.hard_fraction must be in [0, 1], "
                                              f"got {self.hard_fraction}")
        require(0 <= self.lora_dropout < 1, "TrainerConfig.lora_dropout must be in [0, 1)")
        require(self.learning_rate > 0 and self.head_learning_rate > 0,
                "TrainerConfig.learning_rate and head_learning_rate must be > 0")
        require(self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup_steps >= 0,
                "TrainerConfig.weight_decay, grad_clip and warmup_steps must be >= 0")
        require(self.max_users >= 0 and self.val_users >= 0, "TrainerConfig.max_users and val_users must be >= 0")
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                f"TrainerConfig.device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}")


@dataclass
class BlendConfig(JsonConfig):
    """The hybrid score: a small linear model over the cross-encoder and retrieval signals.

    Attributes:
        features: which signals enter the score: ``"ce"`` (cross-encoder score, z-scored per list),
            ``"retrieval"`` (retrieval score, z-scored per list), ``"log_rank"`` (log of the 1-based
            retrieval rank), ``"source"`` (one-hot of the retriever that found the candidate, when the
            candidates carry it) and ``"covisit"`` (the ranker's co-visitation score of the candidate after
            the request's recent items, :mod:`retrieval.covisit`).
        l2: L2 penalty on the weights.
        folds: cross-validation folds over validation users that decide blend vs retrieval order.
        min_gain: the blend must beat retrieval order on cross-validated NDCG@10 by more than this, else
            the retrieval order is kept (the reranker never makes the list worse).
        steps: L-BFGS iterations of the listwise softmax fit.
        seed: seeds the fold assignment.
    """

    features: tuple[str, ...] = ("ce", "retrieval", "log_rank")
    l2: float = 1e-2
    folds: int = 5
    min_gain: float = 0.0
    steps: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        known = ("ce", "retrieval", "log_rank", "source", "covisit")
        bad = [f for f in self.features if f not in known]
        require(not bad, f"BlendConfig.features has unknown names {bad}; choose from {list(known)}")
        require("ce" in self.features, "BlendConfig.features must include 'ce'")
        require(self.l2 >= 0, "BlendConfig.l2 must be >= 0")
        _positive_ints(self, ("folds", "steps"))
