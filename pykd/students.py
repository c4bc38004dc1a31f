"""Students that start from the teacher: initialise a small model from a big one's weights.

A student a tenth of the teacher's size learns far more from distillation when it starts from
the teacher's knowledge than from random weights. Three ways to cut a teacher down, which
combine:

- **depth**: :func:`take_layers` builds a copy of a Hugging Face BERT-family encoder with only
  some of its transformer layers (DistilBERT starts its student from every other teacher
  layer), keeping the embeddings, pooler and task head;
- **vocabulary**: :func:`prune_vocabulary` keeps only the word pieces a task's corpus uses
  (:func:`used_ids`). BERT-base spends 23.4M of its 110M parameters on 30,522 word-piece
  embeddings; a task corpus of a few thousand sentences uses a few thousand of them;
- **width**: :func:`principal_embeddings` compresses the teacher's embedding matrix to a smaller
  width by PCA, for a student of a different architecture (TinyBERT-style students and the
  small students of ``pykd demo`` start from compressed embeddings).

Nothing here imports ``transformers``: :func:`take_layers` rebuilds a model from its own class
and config, so it needs transformers only because the teacher does.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "principal_embeddings",
    "prune_vocabulary",
    "remap",
    "take_layers",
    "used_ids",
]

_SUPPORTED = (
    "Hugging Face encoders whose config has `num_hidden_layers` and whose transformer layers "
    "are the nn.ModuleList `<base model>.encoder.layer`: BERT (BertModel, "
    "BertForSequenceClassification, BertForTokenClassification, BertForMaskedLM, ...; MiniLM "
    "checkpoints are BERT), RoBERTa, XLM-RoBERTa, ELECTRA and others laid out the same way"
)


# --------------------------------------------------------------------------------------------
# depth: take_layers
# --------------------------------------------------------------------------------------------


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ModuleList of ``model``'s transformer layers, or TypeError."""
    config = getattr(model, "config", None)
    if config is None or not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise TypeError(
            f"take_layers: {type(model).__name__} has no `config.num_hidden_layers`; "
            f"supported: {_SUPPORTED}")
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"take_layers: {type(model).__name__} has no `encoder.layer` ModuleList under its "
            f"base model; supported: {_SUPPORTED}")
    if len(layers) != config.num_hidden_layers:
        raise TypeError(
            f"take_layers: {type(model).__name__} has {len(layers)} layers in encoder.layer but "
            f"config.num_hidden_layers={config.num_hidden_layers}")
    for name, module in model.named_modules():
        if module is layers:
            return name, layers
    raise TypeError(f"take_layers: cannot find the layer list inside {type(model).__name__}")


def _layer_indices(layers: Sequence[int], count: int) -> list[int]:
    try:
        chosen = [operator.index(i) for i in layers]
    except TypeError:
        raise TypeError(f"take_layers: layers must be a sequence of ints, got {layers!r}") from None
    if not chosen:
        raise ValueError("take_layers: layers is empty; choose at least one teacher layer")
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise IndexError(
            f"take_layers: layer index {bad[0]} is out of range: the teacher has {count} layers "
            f"(indices 0..{count - 1})")
    duplicates = sorted({i for i in chosen if chosen.count(i) > 1})
    if duplicates:
        raise ValueError(
            f"take_layers: layers {duplicates} are chosen more than once; each teacher layer can "
            "be taken once")
    return chosen


def take_layers(teacher: nn.Module, layers: Sequence[int], **config_overrides: Any) -> nn.Module:
    """A copy of ``teacher`` with only the transformer layers ``layers``, in that order.

    The student is a new model of the teacher's class, built from a copy of its config with
    ``num_hidden_layers=len(layers)`` and ``config_overrides`` applied. Every weight and buffer
    whose shape matches is copied from the teacher: the embeddings, student layer ``j`` from
    teacher layer ``layers[j]``, and the pooler and task head. A weight whose shape changed
    keeps the new model's initialisation: ``num_labels=5`` gives a fresh 5-way classifier on top
    of the teacher's layers. The student has the teacher's dtype, device and train/eval mode;
    the teacher is not modified.

    Supported: Hugging Face encoders whose config has ``num_hidden_layers`` and whose layers
    are the ``nn.ModuleList`` ``model.<base model>.encoder.layer`` (``model.bert.encoder.layer``
    for ``BertFor...`` classes, ``model.encoder.layer`` for ``BertModel``): BERT and MiniLM
    checkpoints (BERT), RoBERTa, XLM-RoBERTa, ELECTRA, ... Not DistilBERT (its layers are
    ``transformer.layer``).

    Depth alone does not make a tenth-size student: BERT-base has 109.5M parameters, 23.4M of
    them word-piece embeddings, so 2 of its 12 layers is still 38.6M. Prune the vocabulary to
    the task's word pieces as well (:func:`prune_vocabulary`: 19.0M with 5,000 of them).

    Args:
        teacher: the model to copy from.
        layers: indices of the teacher layers to keep, in the order the student runs them
            (DistilBERT: ``range(0, 12, 2)``). Each in ``[0, num_hidden_layers)``, none twice.
        **config_overrides: other config attributes for the student (``num_labels``,
            ``hidden_dropout_prob``, ...). Each must be an existing config attribute;
            ``num_hidden_layers`` is set from ``layers``.

    Returns:
        the student model.

    Raises:
        TypeError: the teacher is not a supported model, or an override is not a config
            attribute. IndexError: a layer index out of range. ValueError: no layers, a layer
            chosen twice, or ``num_hidden_layers`` passed as an override.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4,
        ...                     num_attention_heads=4, intermediate_size=64, num_labels=3)
        >>> teacher = BertForSequenceClassification(config)
        >>> student = take_layers(teacher, [0, 2])
        >>> student.config.num_hidden_layers, len(student.bert.encoder.layer)
        (2, 2)
        >>> torch.equal(student.bert.encoder.layer[1].output.dense.weight,
        ...             teacher.bert.encoder.layer[2].output.dense.weight)
        True
        >>> def count(m): return sum(p.numel() for p in m.parameters())
        >>> count(teacher), count(student)
        (55043, 37955)
        >>> take_layers(teacher, [3], num_labels=5).classifier.out_features
        5
    """
    layer_name, teacher_layers = _layer_list(teacher)
    chosen = _layer_indices(layers, len(teacher_layers))
    if "num_hidden_layers" in config_overrides:
        raise ValueError(
            "take_layers: num_hidden_layers comes from `layers`; do not pass it as an override")

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(chosen)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise TypeError(
                f"take_layers: {type(config).__name__} has no attribute {key!r} to override")
        setattr(config, key, value)

    student = type(teacher)(config)
    base, student_base = getattr(teacher, "base_model", teacher), student.base_model
    # BertModel(config, add_pooling_layer=False) (a BertFor...'s own base has no pooler either):
    # the class alone does not say whether the teacher has a pooler, the teacher does.
    if getattr(base, "pooler", True) is None and getattr(student_base, "pooler", None) is not None:
        student_base.pooler = None

    first = next((p for p in teacher.parameters() if p.is_floating_point()), None)
    if first is not None:
        student.to(device=first.device, dtype=first.dtype)

    source = teacher.state_dict()
    prefix = f"{layer_name}."
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            key = name
            if name.startswith(prefix):
                index, rest = name[len(prefix):].split(".", 1)
                key = f"{prefix}{chosen[int(index)]}.{rest}"
            value = source.get(key)
            if value is not None and value.shape == tensor.shape:
                tensor.copy_(value)
    student.train(teacher.training)
    return student


# --------------------------------------------------------------------------------------------
# vocabulary: used_ids, prune_vocabulary, remap
# --------------------------------------------------------------------------------------------


def _collect_ids(item: Any, into: set[int]) -> None:
    if isinstance(item, torch.Tensor):
        into.update(torch.unique(item.detach().cpu()).tolist())
    elif isinstance(item, Mapping):
        if "input_ids" not in item:
            raise TypeError("used_ids: a batch given as a mapping needs an 'input_ids' entry")
        _collect_ids(item["input_ids"], into)
    elif isinstance(item, Iterable) and not isinstance(item, (str, bytes)):
        for x in item:
            if isinstance(x, int):
                into.add(x)
            else:
                _collect_ids(x, into)
    else:
        into.add(operator.index(item))


def used_ids(corpus: Any, special_ids: Iterable[int] = ()) -> list[int]:
    """The sorted token ids that ``corpus`` uses, with ``special_ids`` added.

    ``corpus``: a tensor of ids (any shape), a sequence of sequences of ids (lists or
    tensors), or an iterable of batches that are tensors or mappings with ``input_ids`` (a
    ``DataLoader`` of tokenized batches). Padding ids in padded batches count as used; pass the
    special ids (``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``) so that ids the corpus
    lacks but the model needs are kept. Give it every split the student will see (training,
    transfer set, evaluation): an id it does not return is dropped by :func:`prune_vocabulary`.

    Example:
        >>> used_ids([[5, 3, 9], [3, 3]], special_ids=[0, 1])
        [0, 1, 3, 5, 9]
        >>> used_ids(torch.tensor([[7, 2, 0], [2, 2, 0]]))
        [0, 2, 7]
    """
    ids: set[int] = set()
    _collect_ids(corpus, ids)
    ids.update(operator.index(i) for i in special_ids)
    negative = [i for i in ids if i < 0]
    if negative:
        raise ValueError(f"used_ids: token ids must be >= 0, found {min(negative)}")
    return sorted(ids)


def _replace_parameter(root: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Point every module attribute that holds ``old`` at ``new`` (keeps weight ties)."""
    for module in root.modules():
        for name, param in list(module._parameters.items()):
            if param is old:
                module._parameters[name] = new


def _pruned(param: nn.Parameter, keep: torch.Tensor) -> nn.Parameter:
    rows = param.detach()[keep.to(param.device)].clone()
    return nn.Parameter(rows, requires_grad=param.requires_grad)


def prune_vocabulary(
    model: nn.Module,
    keep_ids: Iterable[int],
    *,
    special_ids: Iterable[int] = (),
    unk_id: int | None = None,
) -> tuple[nn.Module, torch.Tensor]:
    """Shrink ``model``'s vocabulary to ``keep_ids`` (plus ``special_ids``), in place.

    The input word embedding keeps the rows of the kept ids, in increasing old-id order, so
    new id ``k`` is the ``k``-th smallest kept old id. ``special_ids``, the embedding's
    ``padding_idx`` and ``unk_id`` are always kept. When ``model`` has an output projection
    over the vocabulary (``get_output_embeddings()`` returns an ``nn.Linear`` with one output
    per word piece: a masked- or causal-LM head), its rows and bias are pruned the same way; a
    tied output weight stays tied to the input embedding (every reference to a pruned
    parameter anywhere in ``model`` is moved to the pruned one). ``config.vocab_size`` is
    updated, and so are the embedding's ``num_embeddings`` and ``padding_idx``.

    Prune before building the optimizer (the parameters are new objects). The model is changed
    in place; ``copy.deepcopy`` it first to keep the original. Outputs on remapped ids equal the
    original model's outputs on the original ids. Remap the student's batches, and MLM labels,
    with :func:`remap`; the teacher keeps the original ids. An LM head then scores the kept word
    pieces only, so distil it from the teacher's logits at those ids, ``teacher_logits[...,
    kept]`` with ``kept`` the sorted kept old ids (``keep_ids``, ``special_ids``, the padding
    and unk ids).

    BERT-base: 30,522 x 768 = 23.4M embedding parameters; a task using 5,000 word pieces keeps
    3.8M of them (with 2 of its 12 layers, :func:`take_layers`: 19.0M parameters of 109.5M).

    Args:
        model: a module with ``get_input_embeddings()`` returning an ``nn.Embedding`` (a Hugging
            Face model), or an ``nn.Embedding`` itself.
        keep_ids: the old ids to keep (:func:`used_ids` of the corpus).
        special_ids: ids kept whether or not ``keep_ids`` has them (pad, unk, cls, sep, mask).
        unk_id: old id of the unknown token. Given: dropped ids map to its new id, so text with
            word pieces outside the kept set still runs. None: dropped ids map to -1, and
            :func:`remap` raises on them.

    Returns:
        ``(model, id_map)``: the same model, and a ``LongTensor`` of the old vocabulary's size
        (on the CPU) with ``id_map[old_id]`` = the new id, or the new unk id / -1 for a dropped id.

    Example:
        >>> embed = nn.Embedding(10, 4, padding_idx=0)
        >>> embed, id_map = prune_vocabulary(embed, [7, 3], special_ids=[1], unk_id=1)
        >>> embed.weight.shape, embed.padding_idx
        (torch.Size([4, 4]), 0)
        >>> id_map.tolist()  # kept: 0 (pad), 1 (unk), 3, 7; the rest map to unk's new id
        [0, 1, 1, 2, 1, 1, 1, 3, 1, 1]
        >>> remap(torch.tensor([[3, 7, 0]]), id_map)
        tensor([[2, 3, 0]])
    """
    if isinstance(model, nn.Embedding):
        embedding: Any = model
    else:
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"prune_vocabulary: {type(model).__name__} is not an nn.Embedding and has no "
                "get_input_embeddings() returning one (a Hugging Face model has)")
    old_size = embedding.num_embeddings

    keep = {operator.index(i) for i in keep_ids} | {operator.index(i) for i in special_ids}
    if embedding.padding_idx is not None:
        keep.add(embedding.padding_idx)
    if unk_id is not None:
        keep.add(operator.index(unk_id))
    if not keep:
        raise ValueError("prune_vocabulary: nothing to keep; keep_ids and special_ids are empty")
    bad = [i for i in keep if not 0 <= i < old_size]
    if bad:
        raise IndexError(
            f"prune_vocabulary: id {bad[0]} is outside the vocabulary (size {old_size})")
    kept = torch.tensor(sorted(keep), dtype=torch.long)
    id_map = torch.full((old_size,), -1, dtype=torch.long)
    id_map[kept] = torch.arange(len(kept))
    if unk_id is not None:
        id_map[id_map < 0] = id_map[unk_id]

    # The output projection, looked up before the input weight is replaced (to see the tie).
    output = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and not isinstance(model, nn.Embedding):
        output = get_output()
        if output is not None and not (
                isinstance(output, nn.Linear) and output.out_features == old_size):
            out = getattr(output, "out_features", None) or getattr(output, "num_embeddings", None)
            if out == old_size:
                raise TypeError(
                    f"prune_vocabulary: the output layer is a {type(output).__name__}; only an "
                    "nn.Linear output projection over the vocabulary can be pruned")
            output = None  # not over the vocabulary: nothing to prune there

    old_weight = embedding.weight
    new_weight = _pruned(old_weight, kept)
    _replace_parameter(model, old_weight, new_weight)
    embedding.num_embeddings = len(kept)
    if embedding.padding_idx is not None:
        embedding.padding_idx = int(id_map[embedding.padding_idx])

    if output is not None:
        if output.weight is not new_weight:  # untied: prune its own rows
            _replace_parameter(model, output.weight, _pruned(output.weight, kept))
        if output.bias is not None:
            _replace_parameter(model, output.bias, _pruned(output.bias, kept))
        output.out_features = len(kept)

    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None) == old_size:
        config.vocab_size = len(kept)
    return model, id_map


def remap(input_ids: torch.Tensor | Sequence[Any], id_map: torch.Tensor) -> torch.Tensor:
    """Old token ids -> the pruned vocabulary's ids, through ``id_map`` (:func:`prune_vocabulary`).

    Negative values pass through unchanged, so MLM labels padded with -100 can be remapped too.
    ``input_ids``: a tensor (any shape; the result is on its device) or nested lists of ids.

    Raises:
        ValueError: an id was dropped and the vocabulary has no unk id (``id_map`` is -1 there).
        IndexError: an id is outside the old vocabulary.

    Example:
        >>> id_map = torch.tensor([0, -1, 1, 2])
        >>> remap([[3, 2, 0, -100]], id_map)
        tensor([[   2,    1,    0, -100]])
    """
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"remap: token ids must be integers, got {ids.dtype}")
    ids = ids.long()
    table = id_map.to(ids.device)
    valid = ids >= 0
    if ids.numel() and int(ids.max()) >= len(table):
        raise IndexError(
            f"remap: id {int(ids.max())} is outside the old vocabulary (size {len(table)})")
    new = torch.where(valid, table[ids.clamp(min=0)], ids)
    dropped = valid & (new < 0)
    if bool(dropped.any()):
        examples = sorted(set(ids[dropped].tolist()))[:5]
        raise ValueError(
            f"remap: ids {examples} were dropped by prune_vocabulary and there is no unk id to "
            "map them to; keep them, or prune with unk_id=")
    return new


# --------------------------------------------------------------------------------------------
# width: principal_embeddings
# --------------------------------------------------------------------------------------------


def principal_embeddings(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``weight`` ([V, H]) centred and projected on its ``dim`` top principal directions, scaled
    to unit standard deviation: a small student starts from the teacher's word geometry
    (learning 30k word-piece embeddings from a few thousand examples would not).

    The result is float32 [V, dim]; it keeps ``weight``'s autograd history, so pass
    ``weight.detach()`` (or call it under ``torch.no_grad()``) for a teacher's parameter. For
    BERT-base's 30,522 x 768 embeddings, ``dim=64`` gives a 2.0M-parameter table, not 23.4M.

    Example:
        >>> weight = torch.randn(100, 32)
        >>> small = principal_embeddings(weight, 8)
        >>> small.shape, round(small.std().item(), 4)
        (torch.Size([100, 8]), 1.0)
        >>> student_embed = nn.Embedding.from_pretrained(small, freeze=False)
    """
    if not 1 <= dim <= weight.shape[1]:
        raise ValueError(f"dim must be in [1, {weight.shape[1]}] (the teacher's width), got {dim}")
    centred = weight.float() - weight.float().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ vh[:dim].T
    return projected / projected.std()
