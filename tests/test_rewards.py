"""The reward registry (sentiment, refusal keywords, module:function specs) and reward models."""

import pytest
import torch

from conftest import rounding_bound
from negpref import rewards
from negpref.data import pref_task
from negpref.errors import NegprefError
from negpref.models import save_model


def _length_reward(prompt, completion):
    return float(len(completion))


NOT_A_FUNCTION = 3


def test_sentiment_values():
    sentence = "the room was great , the staff was rude and the view was plain ."
    assert rewards.sentiment("p", sentence) == 0.0
    assert rewards.sentiment("p", "great lovely superb") == 1.0
    assert rewards.sentiment("p", "awful, dull") == -1.0
    assert rewards.sentiment("p", "Great day, awful night and an average lunch") == 0.0
    assert rewards.sentiment("p", "no opinion words") == 0.0


def test_refusal_keywords_are_table_5():
    keywords = rewards.REFUSAL_KEYWORDS
    assert len(keywords) == 29 and (keywords[0], keywords[-1]) == ("I'm sorry", "I can't assist")
    assert rewards.refuses("Sure. I cannot do that, it is not ethical.")
    assert rewards.refuses("As an AI, no")
    assert not rewards.refuses("Here is how: step one ...")
    assert not rewards.refuses("i'm sorry")  # case-sensitive, as the GCG check
    assert rewards.refusal_keywords("p", "I'm sorry, but I cannot help with that.") == 1.0
    assert rewards.refusal_keywords("p", "Sure, here is how to do it.") == 0.0


def test_one_registry_resolves_names_and_module_functions():
    assert {
        "sentiment": rewards.sentiment,
        "refusal_keywords": rewards.refusal_keywords,
    } == rewards.REWARDS
    assert rewards.reward_function("sentiment") is rewards.sentiment
    assert rewards.reward_function("refusal_keywords") is rewards.refusal_keywords
    assert rewards.reward_function("tests.test_rewards:_length_reward")("p", "abc") == 3.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("x", "eval_reward: unknown reward 'x'; known rewards: sentiment, refusal_keywords "
              "(or give module:function)"),
        (":f", "eval_reward: unknown reward ':f'"),
        ("negpref.nope:f", "eval_reward: reward 'negpref.nope:f': cannot import (No module"),
        ("negpref.rewards:nope", "eval_reward: reward 'negpref.rewards:nope': cannot import"),
        ("tests.test_rewards:NOT_A_FUNCTION", "is not callable; name a function"),
    ],
)  # fmt: skip
def test_bad_reward_specs_name_the_field(spec, message):
    with pytest.raises(NegprefError) as caught:
        rewards.reward_function(spec, "eval_reward")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    """Tiny Llama reward models with one and two outputs, on the preference-task tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = pref_task.task_tokenizer()
    root = tmp_path_factory.mktemp("rm")
    for labels in (1, 2):
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, num_labels=labels, pad_token_id=0,
        )  # fmt: skip
        torch.manual_seed(labels)
        save_model(LlamaForSequenceClassification(config), tokenizer, root / f"rm{labels}")
    return root, tokenizer


def _logits(path, tokenizer, text):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0]


# A score is a 32-wide dot product of the unit-RMS final hidden state with the head (|w| < 1):
# fp32 rounding eps * 32 = 3.8e-6 (a log-softmax over 2 labels adds rounding of that size).
ATOL = rounding_bound(torch.float32, 32, 1.0)


def test_reward_model_scores_with_its_logit_or_the_last_label_log_prob(reward_models):
    root, tokenizer = reward_models
    text = "Review the car.\nthe engine was great ."
    one = rewards.RewardModel(root / "rm1")
    assert one.num_labels == 1
    expected = _logits(root / "rm1", tokenizer, text)[0].item()
    assert one("Review the car.", "the engine was great .") == pytest.approx(expected, abs=ATOL)
    two = rewards.RewardModel(root / "rm2")
    expected = _logits(root / "rm2", tokenizer, text).log_softmax(-1)[-1].item()
    assert two("Review the car.", "the engine was great .") == pytest.approx(expected, abs=2 * ATOL)


def test_reward_model_batches_equal_single_rows(reward_models):
    root, _ = reward_models
    prompts = pref_task.prompts()[:5]
    completions = ["the room was great .", "awful", "the plot was dull , the music plain .", "",
                   "the view was lovely and the staff was rude ."]  # fmt: skip
    model = rewards.RewardModel(root / "rm1", batch_size=3)
    batched = model.score(prompts, completions)
    single = [model(p, c) for p, c in zip(prompts, completions)]
    # padded rows attend only to their own tokens; the sums differ by fp32 rounding (ATOL)
    assert batched == pytest.approx(single, abs=ATOL)
    assert len(set(batched)) == 5


def test_reward_model_errors_name_the_field(tmp_path):
    with pytest.raises(NegprefError, match=r"^--reward-model .*: not a model directory"):
        rewards.RewardModel(tmp_path, field="--reward-model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NegprefError, match=r"^reward_model .*: could not load \("):
        rewards.RewardModel(tmp_path)
