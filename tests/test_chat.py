"""Chat templates and the checkpoint's tokenizer rules, against transformers.

Three tokenizers in the style of today's checkpoints (a small byte-level BPE trained here, with the
special tokens, tokenizer_config.json and chat template of the family, written as those checkpoints
write them): Llama 3 (BOS from tokenizer.json's post-processor, <|eot_id|> ends a turn, a dated
system header through `strftime_now`), Qwen (ChatML, a default system message, tool calls through
`tojson`, a Qwen3-style empty think block on the last assistant turn), Gemma (BOS by tokenizer.json,
add_bos_token in tokenizer_config.json, a template that writes bos_token and refuses a system message or turns out
of order, <end_of_turn> only in generation_config.json). Each renders, tokenizes, masks and stops as
transformers' `AutoTokenizer` + `apply_chat_template` do. The end-to-end runs (import, chat,
fine-tune on a messages JSONL, export) are at the bottom, marked slow.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llm_jax.data import chat as chat_lib
from llm_jax.data import tokenizer as tok_lib
from llm_jax.runtime.errors import BadValue, NotFound

transformers = pytest.importorskip("transformers", reason="chat template parity needs the 'hf' extra")

LLAMA3 = (
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
        {{- message.content }}
        {%- for call in message.tool_calls or [] %}
            {{- '<tool_call>\\n' + call | tojson + '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# family: (special tokens in vocabulary order, tokenizer_config.json, whether tokenizer.json's
# post-processor adds BOS, generation_config.json's eos tokens)
FAMILIES = {
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3),
        True,
        ["<|end_of_text|>", "<|eot_id|>"],
    ),
    "qwen": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN),
        False,
        ["<|im_end|>", "<|endoftext|>"],
    ),
    "gemma": (
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        dict(
            bos_token={
                "__type": "AddedToken",
                "content": "<bos>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "special": True,
            },
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            add_bos_token=True,  # ignored by transformers 5 when tokenizer.json is there: its post-processor rules
            add_eos_token=False,
            chat_template=GEMMA,
        ),
        True,
        ["<eos>", "<end_of_turn>"],
    ),
}
TEXT = ["Hello there, how are you today? I am fine, thank you.\n", "The capital of France is Paris.\n"] * 30

CHATS = [
    [{"role": "user", "content": "Hello there!"}],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And how are you today?"},
        {"role": "assistant", "content": " I am fine, thank you. "},
    ],
]
SYSTEM = {"role": "system", "content": "You answer briefly."}


def write_tokenizer(path, family: str, vocab_size: int = 320) -> None:
    """A byte-level BPE trained on TEXT with `family`'s special tokens, saved into `path` as the
    family's checkpoints are: tokenizer.json, tokenizer_config.json, generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, config, post_bos, eos = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer)
    if post_bos:  # Llama 3, Gemma: tokenizer.json itself puts BOS in front
        bos = config["bos_token"]
        bos = bos["content"] if isinstance(bos, dict) else bos
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, **config}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=1)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tok.token_to_id(t) for t in eos]}, f)


def ours(path, family: str) -> tok_lib.HFTokenizer:
    """The tokenizer as `convert from_hf` reads it (generation_config.json's eos ids as stop ids)."""
    with open(os.path.join(path, "generation_config.json")) as f:
        stop = json.load(f)["eos_token_id"]
    return tok_lib.HFTokenizer.from_dir(str(path), stop_ids=stop)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, our tokenizer, transformers' AutoTokenizer) of one family."""
    path = tmp_path_factory.mktemp(request.param)
    write_tokenizer(path, request.param)
    return request.param, ours(path, request.param), transformers.AutoTokenizer.from_pretrained(str(path))


def _conversations(name):
    """The CHATS, and with a system message where the family's template takes one."""
    return CHATS + ([] if name == "gemma" else [[SYSTEM, *c] for c in CHATS])


def test_render_and_ids_equal_apply_chat_template(family):
    name, tok, hf_tok = family
    chat = chat_lib.chat_for(tok)
    for messages in _conversations(name):
        for gen in (False, True):
            want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert chat.render(messages, add_generation_prompt=gen) == want, (name, gen)
        want_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert chat_lib.encode_prompt(tok, chat, messages) == list(want_ids)
        if messages[-1]["role"] == "assistant":
            ids, _ = chat_lib.encode_conversation(tok, chat, messages)
            assert ids.tolist() == list(hf_tok.apply_chat_template(messages, return_dict=False))
    bos = {"llama3": "<|begin_of_text|>", "qwen": "<|im_start|>", "gemma": "<bos>"}[name]
    assert chat.render(CHATS[0]).startswith(bos)


def test_tool_calls_render_through_tojson(tmp_path):
    """transformers' tojson: no HTML escaping, non-ASCII kept."""
    write_tokenizer(tmp_path, "qwen")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    call = {"name": "look_up", "arguments": {"query": "a < b & é"}}
    messages = [*CHATS[0], {"role": "assistant", "content": "", "tool_calls": [call]}]
    text = chat_lib.chat_for(ours(tmp_path, "qwen")).render(messages)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False)
    assert '"a < b & é"' in text


def test_gemma_template_refuses_system_and_disorder(tmp_path):
    write_tokenizer(tmp_path, "gemma")
    chat = chat_lib.chat_for(ours(tmp_path, "gemma"), where=str(tmp_path))
    with pytest.raises(chat_lib.ChatError, match=r"refuses this conversation: System role not supported"):
        chat.render([SYSTEM, *CHATS[0]])
    with pytest.raises(chat_lib.ChatError, match=r"roles must alternate"):
        chat.render(CHATS[0] * 2)
    with pytest.raises(Exception, match="System role not supported"):  # transformers refuses it the same way
        transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template([SYSTEM, *CHATS[0]])


def test_assistant_mask_is_each_assistant_turn_and_its_end(family):
    name, tok, _ = family
    chat = chat_lib.chat_for(tok)
    messages = CHATS[1]
    ids, learn = chat_lib.encode_conversation(tok, chat, messages)
    end = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>", "gemma": "<end_of_turn>"}[name]
    learned = [tok.tok.id_to_token(int(i)) for i in ids[learn]]
    assert learned.count(end) == 2  # each turn's end: the model learns to stop
    # The learned tokens are the assistant turns: split at the end tokens, they decode to the contents.
    turns, cur = [], []
    for t, i in zip(learned, ids[learn]):
        if t == end:
            turns.append(tok.tok.decode(cur))
            cur = []
        else:
            cur.append(int(i))
    think = "<think>\n\n</think>\n\n" if name == "qwen" else ""  # Qwen3 style: the last turn's empty think block
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    if name != "qwen":  # Llama 3 and Gemma trim the content
        contents = [c.strip() for c in contents]
    assert turns == [contents[0], think + contents[1]]
    assert not learn[: int(np.argmax(learn))].any() and learn.sum() < len(ids) / 2


def test_mask_equals_transformers_generation_markers(tmp_path):
    """A template with {% generation %} markers: transformers' own assistant mask equals ours."""
    write_tokenizer(tmp_path, "qwen")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}"
        "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    want = hf_tok.apply_chat_template(CHATS[1], return_dict=True, return_assistant_tokens_mask=True)
    ids, learn = chat_lib.encode_conversation(
        ours(tmp_path, "qwen"), chat_lib.chat_for(ours(tmp_path, "qwen")), CHATS[1]
    )
    assert ids.tolist() == list(want["input_ids"])
    assert learn.astype(int).tolist() == list(want["assistant_masks"])


def test_bos_eos_rules_stop_ids_and_decode_equal_transformers(family):
    name, tok, hf_tok = family
    for text in ["Hello there", "The capital of France is Paris.\n", "a<|im_end|>b <eos>"]:
        assert tok.encode_special(text) == hf_tok(text)["input_ids"], (name, text)
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.encode_prompt(text) == hf_tok(text)["input_ids"]
        ids = tok.encode_special(text)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    first = {"llama3": "<|begin_of_text|>", "qwen": None, "gemma": "<bos>"}[name]
    got = tok.encode_prompt("Hello")[0]
    assert (tok.tok.id_to_token(got) == first) if first else got == tok.encode("Hello")[0]
    names = {tok.tok.id_to_token(i) for i in tok.stop_ids}
    assert names == {hf_tok.eos_token, *FAMILIES[name][3]}
    assert tok.special_tokens == hf_tok.special_tokens_map
    decoded = tok.decode(tok.encode(chat_lib.chat_for(tok).render(CHATS[1])))
    assert "Paris." in decoded and not any(t in decoded for t in FAMILIES[name][0])  # no special token's text


def test_tokenizer_files_saved_and_fingerprinted(family, tmp_path):
    name, tok, _ = family
    tok.save(str(tmp_path))
    back = tok_lib.load(str(tmp_path))
    assert (back.stop_ids, back.special_tokens, back.chat_template) == (
        tok.stop_ids,
        tok.special_tokens,
        tok.chat_template,
    )
    assert back.encode_prompt("Hello") == tok.encode_prompt("Hello")
    assert tok_lib.fingerprint(back) == tok_lib.fingerprint(tok)
    # A template added to a run later (workdir/tokenizer/chat_template.jinja) keeps its checkpoints usable.
    other = tok_lib.HFTokenizer(
        tok.json_str, tok.eos_id, {**tok.side_files, "chat_template.jinja": "{{ 1 }}"}, tok.stop_ids
    )
    assert other.chat_template == "{{ 1 }}" and tok_lib.fingerprint(other) == tok_lib.fingerprint(tok)


def test_one_line_errors(tmp_path):
    write_tokenizer(tmp_path, "qwen")
    tok = ours(tmp_path, "qwen")
    chat = chat_lib.chat_for(tok)
    with pytest.raises(BadValue, match=r"messages\[1\]: role 'bot' is not one of system, user, assistant, tool"):
        chat_lib.encode_prompt(tok, chat, [CHATS[0][0], {"role": "bot", "content": "x"}])
    with pytest.raises(BadValue, match=r"messages\[0\]: 'content' must be a string, got int"):
        chat_lib.encode_prompt(tok, chat, [{"role": "user", "content": 3}])
    with pytest.raises(BadValue, match=r"messages\[0\] is the assistant's"):
        chat_lib.encode_conversation(tok, chat, [{"role": "assistant", "content": "x"}])
    bare = tok_lib.HFTokenizer(tok.json_str, tok.eos_id)
    with pytest.raises(NotFound, match=r"RUN has no chat template .*\(--chat_template FILE\)"):
        chat_lib.chat_for(bare, where="RUN")
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert chat_lib.chat_for(bare, str(tmp_path / "t.jinja")).render(CHATS[0]) == "Hello there!"
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(chat_lib.ChatError, match=r"bad.jinja is not valid Jinja"):
        chat_lib.chat_for(bare, str(tmp_path / "bad.jinja")).render(CHATS[0])


# ----------------------------------------------------------------------------------------------
# As a new user: a random Qwen3 / Gemma 3 checkpoint with its tokenizer, imported, chatted with,
# fine-tuned on a messages JSONL (and resumed), exported, read back by transformers.

# architecture (tests/test_hf_families.py's random models) -> tokenizer family of this file
USER_FLOWS = {"qwen3": "qwen", "gemma3": "gemma"}


def make_checkpoint(path, arch: str):
    """test_hf_families' random `arch` model over our tokenizer's vocabulary, with the family's
    tokenizer files beside it; returns the torch model."""
    torch = pytest.importorskip("torch")
    from test_hf_families import _SIZES, ARCHS

    family = USER_FLOWS[arch]
    write_tokenizer(path, family)
    tok = ours(path, family)
    generation = (path / "generation_config.json").read_text()
    cls, fields, _ = ARCHS[arch]
    ids = dict(eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=None)
    torch.manual_seed(0)
    config = getattr(transformers, cls)(
        **{**_SIZES, **fields, **ids, "vocab_size": tok.vocab_size, "max_position_embeddings": 128}
    )
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.eval().save_pretrained(path)
    (path / "generation_config.json").write_text(generation)  # the family's eos list, as published
    return model


def write_chat_jsonl(path, n: int = 24, system: bool = True) -> None:
    with open(path, "w") as f:
        for i in range(n):
            turns = [
                {"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": f"It is {i + 1}."},
                {"role": "user", "content": "Thank you."},
                {"role": "assistant", "content": "You are welcome."},
            ]
            f.write(json.dumps({"messages": ([SYSTEM] if system else []) + turns}) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(USER_FLOWS))
def test_import_chat_finetune_resume_export(tmp_path, arch):
    import importlib.util

    import jax
    import runlib
    import torch

    from llm_jax.training import loop
    from llm_jax.training.saved_run import load_run

    src, work, out = tmp_path / "src", tmp_path / "run", tmp_path / "out"
    tmodel = make_checkpoint(src, arch)
    p = runlib.run_cli("llm_jax.convert", "from_hf", "--hf_dir", str(src), "--workdir", str(work))
    assert p.returncode == 0, p.stderr[-3000:]
    names = sorted(os.listdir(work / "tokenizer"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(names), names

    # generate --chat: the reply of transformers' greedy generate on apply_chat_template's ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(src))
    messages = [{"role": "user", "content": "Hello there!"}]
    p = runlib.run_cli(
        "llm_jax.generate", "--workdir", str(work), "--chat", "Hello there!", "--max_new_tokens", "12",
        "--temperature", "0", "--format", "jsonl", devices=1,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    reply = json.loads(p.stdout.strip().splitlines()[-1])["reply"]
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        want = tmodel.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert reply == hf_tok.decode(want, skip_special_tokens=True)
    if arch == "gemma3":  # its template refuses a system message: one line, the template's own words
        p = runlib.run_cli(
            "llm_jax.generate", "--workdir", str(work), "--chat", "Hi", "--system", "Be brief.", devices=1
        )
        runlib.assert_one_line_error(p, "generate", "refuses this conversation: System role not supported")

    # fine-tune on a messages JSONL (2 steps), then resume to 3
    write_chat_jsonl(tmp_path / "chat.jsonl", system=arch != "gemma3")
    spec = importlib.util.spec_from_file_location("hf_finetune", os.path.join(runlib.REPO, "configs", "hf_finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(str(work))
    config.data.update(source="jsonl", path=str(tmp_path / "chat.jsonl"))
    config.train.update(num_steps=2, log_every=1, eval_every=2, eval_steps=1, checkpoint_every=1, sample_tokens=4)
    config.mesh.update(data=-1, fsdp=1)
    assert (
        loop.train_and_evaluate(
            config,
            str(work),
        )["step"]
        == 2
    )
    config.train.num_steps = 3
    assert (
        loop.train_and_evaluate(
            config,
            str(work),
        )["step"]
        == 3
    )

    p = runlib.run_cli("llm_jax.convert", "to_hf", "--workdir", str(work), "--hf_dir", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    run = load_run(str(work), on_host=True)
    toks = np.random.RandomState(0).randint(0, run.tokenizer.vocab_size, (2, 16)).astype(np.int32)
    ours_logits = np.asarray(jax.jit(run.model.apply)({"params": run.params}, toks))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = back(torch.as_tensor(toks)).logits.numpy()
    assert float(np.abs(theirs - ours_logits).max()) < 1e-4
    with torch.no_grad():  # and the fine-tuning changed the model
        assert float(np.abs(tmodel(torch.as_tensor(toks)).logits.numpy() - theirs).max()) > 1e-3
    back_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    chat = chat_lib.chat_for(run.tokenizer)
    for conv in (messages, CHATS[1]):
        assert back_tok.apply_chat_template(conv, tokenize=False) == chat.render(conv)
    assert back_tok("Hello there")["input_ids"] == run.tokenizer.encode_prompt("Hello there")


def test_messages_jsonl_errors_name_the_line(tmp_path):
    import ml_collections

    from llm_jax.data import lm_data

    write_tokenizer(tmp_path, "gemma")
    path = tmp_path / "chat.jsonl"
    write_chat_jsonl(path, n=3, system=False)
    with open(path, "a") as f:
        f.write(json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    with pytest.raises(BadValue, match=r"chat.jsonl:4: messages\[0\]: role 'robot' is not one of"):
        lm_data.read_jsonl_examples(str(path))
    write_chat_jsonl(path, n=10, system=True)  # the Gemma template refuses it: the line is named
    cfg = ml_collections.ConfigDict(
        dict(source="jsonl", path=str(path), val_path="", val_fraction=0.1, tokenizer="hf", vocab_size=0,
             tokenizer_path=str(tmp_path / "tokenizer.json"), seq_len=64)
    )  # fmt: skip
    with pytest.raises(chat_lib.ChatError, match=r"chat.jsonl:1: the chat template .* System role not supported"):
        lm_data.load_data(cfg, log=lambda *a: None)
    write_chat_jsonl(path, n=12, system=False)
    data = lm_data.load_data(cfg, log=lambda *a: None)
    longest = max(len(ids) for ids, _ in data.train_examples)
    tokens, mask, truncated = data.rows("train", longest)
    assert truncated == 0 and 0 < mask.sum() < (tokens != 0).sum()
    tokens, mask, truncated = data.rows("train", 15)  # longer than a row: kept from the end, counted
    assert truncated == len(data.train_examples) and mask.any(axis=1).all()
    said = []
    short, long = sorted(data.train_examples, key=lambda e: len(e[0]))[:: len(data.train_examples) - 1]
    assert len(long[0]) > len(short[0])  # "What is 10 plus one?" has a digit more than "... 0 ..."
    some_cut = lm_data.PromptCompletionData(data.tokenizer, [short, long], [short], log=said.append)
    some_cut.check(len(short[0]) - 1)  # some are cut: a count, not an error
    assert len(said) == 1 and said[0].startswith(
        f"data: 1 of 2 training examples are longer than seq_len+1={len(short[0])}"
    )
    with pytest.raises(BadValue, match="every training example is longer"):
        data.check(14)
