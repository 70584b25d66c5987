from qa_lab import prompts
from qa_lab.records import Passage, QAItem

SYSTEM, HEADER = "Be brief.", "Reference passages:"


def test_same_prompt_for_all_models_only_context_differs(tokenizer):
    closed = prompts.build_messages("What is a heap?", [], system=SYSTEM, context_header=HEADER)
    ctx = [Passage("t1", "What is a stack?", "LIFO.", 0.7), Passage("t2", "Queue?", "FIFO.", 0.6)]
    rag = prompts.build_messages("What is a heap?", ctx, system=SYSTEM, context_header=HEADER)
    assert closed[0] == rag[0] == {"role": "system", "content": SYSTEM}
    assert closed[1]["content"] == "Question: What is a heap?"
    assert rag[1]["content"].endswith(closed[1]["content"])
    assert "<passage 1>" in rag[1]["content"] and "</passage 2>" in rag[1]["content"]
    text = prompts.render_prompt(tokenizer, rag)
    assert text.endswith("<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" not in text  # our system prompt wins


def test_sft_example_is_prompt_completion():
    item = QAItem("x", "What is TCP?", " A reliable byte stream. ")
    ex = prompts.sft_example(item, [], system=SYSTEM, context_header=HEADER)
    assert ex["prompt"] == prompts.build_messages(
        "What is TCP?", [], system=SYSTEM, context_header=HEADER
    )
    assert ex["completion"] == [{"role": "assistant", "content": "A reliable byte stream."}]


# Mistral-7B-Instruct-v0.2's chat template: user/assistant turns only.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


def test_system_turn_is_folded_into_the_user_turn_for_templates_without_one(tokenizer):
    import copy

    mistral_like = copy.deepcopy(tokenizer)
    mistral_like.chat_template = MISTRAL_TEMPLATE
    messages = prompts.build_messages("What is a heap?", [], system=SYSTEM, context_header=HEADER)
    text = prompts.render_prompt(mistral_like, messages)
    assert (
        text == f"{tokenizer.bos_token or ''}[INST] {SYSTEM}\n\nQuestion: What is a heap? [/INST]"
    )
    # a template that takes a system turn keeps it as its own turn
    assert prompts.fit_template(tokenizer, messages) == messages
