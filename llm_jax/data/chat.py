"""Chat templates: a conversation rendered as the checkpoint's `chat_template` renders it.

A Hugging Face checkpoint says how its conversations look in its tokenizer files
(tokenizer_config.json's `chat_template`, or chat_template.jinja beside it; read by
llm_jax/data/tokenizer.py's `HFTokenizer`). `render` runs that Jinja template exactly as
transformers' `apply_chat_template` does (transformers/utils/chat_template_utils.py): a sandboxed
`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, the loop-controls
extension, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, and the named
special tokens (`bos_token`, `eos_token`, ...) as variables next to `messages` and
`add_generation_prompt`. Templates come from the Hub and are untrusted code: the sandbox is why
jinja2 >= 3.1.6 is required.

    chat = chat_for(tokenizer)                                     # the run's template
    text = chat.render(messages, add_generation_prompt=True)       # the prompt `generate --chat` completes
    ids, learn = encode_conversation(tokenizer, chat, messages)    # fine-tuning: learn the assistant turns

`encode_conversation` marks the assistant's tokens without needing `{% generation %}` markers in
the template: each assistant turn starts where the conversation rendered up to it with the
generation prompt stops agreeing with the whole conversation, and ends with its end-of-turn token
(one of the tokenizer's stop ids, so the model learns to stop) or, for a template that writes
none, where the conversation rendered up to that turn ends.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from datetime import datetime

import numpy as np

from llm_jax.runtime.errors import BadValue, NotFound

ROLES = ("system", "user", "assistant", "tool")


class ChatError(BadValue):
    """A conversation or chat template that cannot be rendered; the message names which and why."""


def _generation_extension():
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it) rendered
    as its body: a template that has it renders here too (the spans come from `assistant_spans`)."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in transformers' environment (cached: a data set renders it per example)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' (and so every template's author) does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_generation_extension(), jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def check_messages(messages, where: str = "messages") -> list[dict]:
    """`messages` as the template sees them: a non-empty list of {"role": one of ROLES, "content":
    str} dicts (other keys kept, keys whose value is null dropped, as transformers does); else a
    ChatError naming `where` and the message."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f'{where}: expected a non-empty list of {{"role": ..., "content": ...}} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"{where}[{i}]: expected an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"{where}[{i}]: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"{where}[{i}]: 'content' must be a string, got {type(content).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


@dataclasses.dataclass(frozen=True)
class Chat:
    """A chat template with what it is rendered with."""

    template: str  # the Jinja source
    variables: dict  # the named special tokens: {'bos_token': '<bos>', 'eos_token': ...}
    end_tokens: tuple[str, ...]  # the stop tokens' text: an assistant turn ends with one of them
    origin: str  # where the template was read, for error messages

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as `apply_chat_template(..., tokenize=False)` gives it."""
        import jinja2

        try:
            return _compile(self.template).render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self.variables,
            )  # fmt: skip
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(f"the chat template of {self.origin} is not valid Jinja (line {e.lineno}: {e})") from None
        except jinja2.TemplateError as e:  # raise_exception in the template: the conversation breaks its rules
            raise ChatError(f"the chat template of {self.origin} refuses this conversation: {e}") from None


def chat_for(
    tokenizer, template_path: str | None = None, where: str = "the run's tokenizer", fix: str = "--chat_template FILE"
) -> Chat:
    """The Chat of an HF tokenizer: its own template, or the Jinja file `template_path` instead.

    No template is a NotFound naming what was searched (`where`) and the two ways out (`fix`: how
    the caller takes a template file).
    """
    if template_path:
        if not os.path.isfile(template_path):
            raise NotFound(f"chat template file {template_path} does not exist")
        with open(template_path, encoding="utf-8") as f:
            template, origin = f.read(), template_path
    else:
        template, origin = getattr(tokenizer, "chat_template", None), where
    if not template:
        raise NotFound(
            f"{where} has no chat template (no 'chat_template' in tokenizer_config.json, no chat_template.jinja); "
            f"pass a Jinja template file ({fix}) or use a checkpoint whose tokenizer_config.json has one"
        )
    variables = dict(getattr(tokenizer, "special_tokens", {}))
    vocab = getattr(tokenizer, "tok", None)  # an HF tokenizer's `tokenizers.Tokenizer`; others name no tokens
    ends = tuple(t for t in (vocab.id_to_token(i) for i in tokenizer.stop_ids) if t) if vocab else ()
    return Chat(template, variables, ends, origin)


def conversation(user: str | None = None, system: str | None = None, path: str | None = None) -> list[dict]:
    """The conversation to continue: the messages of the JSON file `path` (a list of messages, or an
    object with a "messages" list), then the `system` message (first) and the `user` message
    (last) where given."""
    messages = []
    if path:
        if not os.path.isfile(path):
            raise NotFound(f"messages file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatError(f"{path} is not a JSON file ({e}); give a list of {{'role', 'content'}} objects") from None
        messages = loaded.get("messages") if isinstance(loaded, dict) else loaded
        messages = check_messages(messages, path)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    if user is not None:
        messages.append({"role": "user", "content": user})
    return check_messages(messages)


def encode_prompt(tokenizer, chat: Chat, messages: list[dict]) -> list[int]:
    """The conversation with the generation prompt as token ids: what the model continues as the
    assistant. Like apply_chat_template, the rendered text is encoded with no special tokens
    added: the template writes its own BOS."""
    return tokenizer.encode(chat.render(check_messages(messages), add_generation_prompt=True))


def assistant_spans(chat: Chat, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation rendered, and the [start, end) character span of each assistant turn in it."""
    full = chat.render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ChatError("messages[0] is the assistant's: a conversation to learn from starts with a user message")
        head = chat.render(messages[:i], add_generation_prompt=True)
        start = len(os.path.commonprefix([head, full]))
        upto = chat.render(messages[: i + 1])
        limit = len(upto) if full.startswith(upto) else None
        end = _first_end(full, start, len(full) if limit is None else limit, chat.end_tokens)
        if end is None:
            end = limit
        if end is None or end <= start:
            raise ChatError(
                f"messages[{i}]: cannot find where this assistant turn ends in the rendering of {chat.origin} "
                "(it writes no end-of-turn token and renders the turn differently once later messages follow)"
            )
        spans.append((start, end))
    return full, spans


def _first_end(text: str, start: int, stop: int, end_tokens: tuple[str, ...]) -> int | None:
    """The end of the first end-of-turn token in text[start:stop], or None."""
    found = [j + len(t) for t in end_tokens if (j := text.find(t, start, stop)) >= 0]
    return min(found) if found else None


def encode_conversation(
    tokenizer, chat: Chat, messages: list[dict], first_turn: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A whole conversation as (ids int32 [n], learn bool [n]): the ids are apply_chat_template's
    (the rendered text encoded whole), `learn` is True on the tokens of the assistant turns, each
    with its end-of-turn token (a token that overlaps a turn's span counts, as transformers' own
    assistant masks count it), from the `first_turn`-th assistant turn on (0: all of them)."""
    full, spans = assistant_spans(chat, check_messages(messages))
    ids, offsets = tokenizer.encode_with_offsets(full)
    learn = np.zeros(len(ids), bool)
    for start, end in spans[first_turn:]:
        learn |= np.asarray([s < end and e > start for s, e in offsets], bool).reshape(-1)
    return np.asarray(ids, np.int32), learn
