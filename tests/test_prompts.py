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
