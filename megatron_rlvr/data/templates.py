"""Prompt rendering: the tokenizer's own chat template, or a named built-in one for tokenizers without it.

Built-in templates (for base models and tokenizers that ship none):
- `tulu`: the Tülu / open-instruct format, `<|user|>\\n{content}\\n` per message (roles system/user/assistant;
  an assistant turn ends with the EOS token), then the generation prompt `<|assistant|>\\n`.
- `plain`: the message contents joined by blank lines, roles dropped, for completion-style base models.
Both start with the tokenizer's BOS token when it has one, as HF chat templates do, so a rendered prompt is
encoded with `add_special_tokens=False` whichever template produced it.
"""

from typing import Callable, Dict, Optional, Sequence

Messages = Sequence[Dict[str, str]]


def _tulu(messages: Messages, bos: str, eos: str) -> str:
    parts = [bos]
    for message in messages:
        parts.append(f"<|{message['role']}|>\n{message['content']}")
        parts.append(f"{eos}\n" if message["role"] == "assistant" else "\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _plain(messages: Messages, bos: str, eos: str) -> str:
    return bos + "\n\n".join(message["content"] for message in messages)


BUILTIN_TEMPLATES: Dict[str, Callable[[Messages, str, str], str]] = {"tulu": _tulu, "plain": _plain}

TOKENIZER_TEMPLATE = "tokenizer"


def render_prompt(messages: Messages, tokenizer, template: Optional[str] = None) -> str:
    """The prompt text for `messages`, ending where the assistant's response starts.

    `template`: None or "tokenizer" uses `tokenizer.apply_chat_template(..., add_generation_prompt=True)`;
    a built-in name (`tulu`, `plain`) uses that template instead.
    """
    if template in (None, TOKENIZER_TEMPLATE):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no chat template; "
                f"name a built-in one ({', '.join(BUILTIN_TEMPLATES)}) with the data config's chat_template"
            )
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if template not in BUILTIN_TEMPLATES:
        raise ValueError(
            f"unknown chat template {template!r}; known: {TOKENIZER_TEMPLATE}, {', '.join(BUILTIN_TEMPLATES)}"
        )
    return BUILTIN_TEMPLATES[template](messages, tokenizer.bos_token or "", tokenizer.eos_token or "")
