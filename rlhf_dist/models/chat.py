"""Chat templates: how a prompt becomes the policy's input and an exchange the reward model's.

Tokenizer-side only (no model, no torch): the data stages, the generation engines and the reward
actor format text the same way through these.
"""

from __future__ import annotations


def has_chat_template(tokenizer, enabled: bool) -> bool:
    """Whether to apply the tokenizer's chat template: it has one and ``data.chat_template`` is on."""
    return enabled and bool(getattr(tokenizer, "chat_template", None))


def prompt_token_ids(tokenizer, text: str, use_template: bool) -> list[int]:
    """The policy's input for a prompt: the chat template's user turn and generation prompt when
    the tokenizer has a template (and ``use_template``: ``data.chat_template``), else the text as is."""
    if has_chat_template(tokenizer, use_template):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(chat, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def conversation_text(tokenizer, prompt: str, response: str, use_template: bool) -> str:
    """What a reward model reads: the chat-templated exchange, or prompt + response."""
    if has_chat_template(tokenizer, use_template):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
    return prompt + response
