"""Chat templates, the tokenized prompt dataset, the resumable loader and collation, on the GSM8K sample."""

import logging

import pytest
import torch

from megatron_rlvr.data import (
    PromptLoader,
    RLVRPromptDataset,
    build_training_batch,
    collate_prompts,
    pad_sequences,
    read_gsm8k,
    render_prompt,
    write_jsonl,
)

from .conftest import GSM8K_SAMPLE, build_tiny_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
# A Jinja chat template of the kind HF tokenizers ship, deliberately different from the built-in ones.
JINJA = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_builtin_templates_render_exactly(tiny_tokenizer):
    assert render_prompt(MESSAGES, tiny_tokenizer, "tulu") == \
        "<s><|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n"
    assert render_prompt(MESSAGES, tiny_tokenizer, "plain") == "<s>Be brief.\n\n2+2?"
    turns = MESSAGES + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    assert render_prompt(turns, tiny_tokenizer, "tulu").endswith(
        "<|assistant|>\n4</s>\n<|user|>\n3+3?\n<|assistant|>\n")


def test_tokenizer_chat_template_is_used():
    tokenizer = build_tiny_tokenizer(chat_template=JINJA)
    assert render_prompt(MESSAGES, tokenizer) == "[system] Be brief.\n[user] 2+2?\n[assistant] "
    assert render_prompt(MESSAGES, tokenizer, "tokenizer") == render_prompt(MESSAGES, tokenizer)


def test_template_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="has no chat template; name a built-in one \\(tulu, plain\\)"):
        render_prompt(MESSAGES, tiny_tokenizer)
    with pytest.raises(ValueError, match="unknown chat template 'chatml'; known: tokenizer, tulu, plain"):
        render_prompt(MESSAGES, tiny_tokenizer, "chatml")


def test_dataset_filters_long_prompts_and_counts_them(tiny_tokenizer, caplog):
    records = read_gsm8k(GSM8K_SAMPLE)
    lengths = [len(tiny_tokenizer(render_prompt(r.messages, tiny_tokenizer, "tulu"),
                                  add_special_tokens=False)["input_ids"]) for r in records]
    limit = sorted(lengths)[2]  # keeps the three shortest (lengths are distinct on this sample)
    assert len(set(lengths)) == 5
    with caplog.at_level(logging.WARNING, logger="megatron_rlvr.data.dataset"):
        dataset = RLVRPromptDataset(records, tiny_tokenizer, max_prompt_length=limit, chat_template="tulu")
    assert dataset.num_dropped == 2
    assert f"dropped 2 of 5 prompts longer than max_prompt_length={limit} tokens" in caplog.text
    kept = [r.ground_truth for r, n in zip(records, lengths) if n <= limit]
    assert [p.record.ground_truth for p in dataset] == kept
    with pytest.raises(ValueError, match="no prompt is left: all 5 are longer than max_prompt_length=3"):
        RLVRPromptDataset(records, tiny_tokenizer, max_prompt_length=3, chat_template="tulu")


def test_gsm8k_end_to_end_load_render_and_verify(tiny_tokenizer, tmp_path):
    """Raw GSM8K -> RLVR JSONL -> tokenized prompts -> the gsm8k verifier scores responses."""
    from megatron_rlvr.rewards import verify

    path = tmp_path / "gsm8k_rlvr.jsonl"
    write_jsonl(read_gsm8k(GSM8K_SAMPLE), path)
    dataset = RLVRPromptDataset.from_files(path, tiny_tokenizer, max_prompt_length=512, chat_template="tulu")
    assert len(dataset) == 5 and dataset.num_dropped == 0
    prompt = dataset[0]
    assert tiny_tokenizer.decode(list(prompt.prompt_ids)) == prompt.text
    assert prompt.text.startswith("<s><|user|>\nNatalia sold clips") and prompt.text.endswith("<|assistant|>\n")

    record = prompt.record
    assert verify(record.dataset, "48 / 2 = 24 in May, so 48 + 24 = 72.\n#### 72", record.ground_truth) == 1.0
    assert verify(record.dataset, "She sold 48 + 24 = 72 clips in total.", record.ground_truth) == 1.0
    assert verify(record.dataset, "48 + 48 = 96.\n#### 96", record.ground_truth) == 0.0
    assert verify(record.dataset, "72 clips? No: 48 * 2 = 96", record.ground_truth) == 0.0


def test_loader_shuffles_per_epoch_deterministically():
    items = list(range(10))
    loader = PromptLoader(items, batch_size=3, seed=7)
    assert loader.batches_per_epoch == 3
    epochs = [[x for _ in range(3) for x in next(loader)] for _ in range(2)]
    for order in epochs:  # each epoch: 9 distinct items (the 10th is past the last full batch)
        assert len(set(order)) == 9
    assert epochs[0] != epochs[1]
    again = PromptLoader(items, batch_size=3, seed=7)
    assert [x for _ in range(6) for x in next(again)] == epochs[0] + epochs[1]
    other_seed = PromptLoader(items, batch_size=3, seed=8)
    assert [x for _ in range(3) for x in next(other_seed)] != epochs[0]
    unshuffled = PromptLoader(items, batch_size=4, shuffle=False, drop_last=False)
    assert [next(unshuffled) for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


@pytest.mark.parametrize("k", [0, 2, 3, 5])
def test_loader_resume_gives_the_same_continuation(k):
    items = [f"prompt-{i}" for i in range(7)]
    run = PromptLoader(items, batch_size=2, seed=3)
    for _ in range(k):
        next(run)
    state = run.state_dict()
    expected = [next(run) for _ in range(8)]  # crosses at least two epoch boundaries (3 batches an epoch)

    resumed = PromptLoader(items, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(8)] == expected


def test_loader_refuses_changed_settings():
    state = PromptLoader(list(range(7)), batch_size=2, seed=3).state_dict()
    with pytest.raises(ValueError, match="seed: checkpoint 3 vs now 4; num_items: checkpoint 7 vs now 8"):
        PromptLoader(list(range(8)), batch_size=2, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        PromptLoader([1, 2], batch_size=4)


def test_pad_sequences_both_sides():
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0, side="right", length=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="3 tokens does not fit the padded length 2"):
        pad_sequences([[1, 2, 3]], pad_id=0, length=2)
    with pytest.raises(ValueError, match="pad side must be one of"):
        pad_sequences([[1]], pad_id=0, side="middle")


def test_training_batch_layout():
    batch = build_training_batch([[11, 12], [13]], [[21], [22, 23, 24]], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 21, 0, 0], [0, 13, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]
    assert batch["responses"].tolist() == [[21, 0, 0], [22, 23, 24]]
    assert batch["response_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    # the documented alignment: logits column P - 1 + j predicts responses[:, j]
    p = batch["input_ids"].shape[1] - batch["responses"].shape[1]
    assert torch.equal(batch["input_ids"][:, p:], batch["responses"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        build_training_batch([[1], [2]], [[3]], pad_id=0)


def test_collate_prompts_for_rollout(tiny_tokenizer):
    dataset = RLVRPromptDataset(read_gsm8k(GSM8K_SAMPLE)[:2], tiny_tokenizer, max_prompt_length=512,
                                chat_template="tulu")
    batch = collate_prompts(list(dataset), pad_id=tiny_tokenizer.pad_token_id)
    assert batch["prompt_ids"] == [list(p.prompt_ids) for p in dataset]
    assert batch["ground_truths"] == ["72", "10"] and batch["datasets"] == ["gsm8k", "gsm8k"]
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert lengths == [len(p.prompt_ids) for p in dataset]
    for row, ids in enumerate(batch["prompt_ids"]):  # left padded: every prompt ends in the last column
        assert batch["input_ids"][row, -len(ids):].tolist() == ids
