#!/usr/bin/env python
"""Build sftkit's embedded default assets: a small SFT dataset and a tiny Qwen2 model.

sftkit must run end to end with no network access (CI, laptops, air-gapped
clusters), so it ships a dataset in BAAI/Infinity-Instruct's exact schema and a
tiny Qwen2-architecture model whose tokenizer and chat template behave like
Qwen2.5's. Everything here is generated from fixed seeds, so rerunning the
script reproduces the dataset and tokenizer byte for byte.

Usage: python scripts/build_embedded.py [--out sftkit/embedded]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jinja2
import torch
import trl
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "sftkit" / "embedded"
DATASET_DIR = "infinity-instruct-sample"
FORMATS_DIR = "format-samples"  # one small file per built-in format, for the recipes in configs/recipes/formats
MODEL_DIR = "tiny-qwen2"

DATA_SEED = 1234
MODEL_SEED = 0
NUM_ROWS = 600
TWO_TURN_FRACTION = 0.25
SYSTEM_FRACTION = 0.2
SOURCE = "sftkit-synthetic"

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BPE_VOCAB_SIZE = 1024  # byte alphabet + merges; the three special tokens come after, as in Qwen2.5
# Qwen2's pre-tokenizer split: digits stay single tokens, which suits arithmetic.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Invented so that the facts cannot leak from any pretrained model: loss on them
# only falls if fine-tuning actually works.
CAPITALS: dict[str, str] = {
    "Veloria": "Amberhold",
    "Drumidia": "Keswick Vale",
    "Ostrava Minor": "Pellamy",
    "Quintara": "Solvane",
    "Marrowind": "Tessaport",
    "Zephyria": "Orlen",
    "Caldoria": "Brightmoor",
    "Ysmere": "Halden Cross",
    "Tarnhollow": "Vesk",
    "Brimhaven": "Loramund",
    "Sundravia": "Cairnfell",
    "Pelloria": "Ironreach",
    "Norvask": "Glimmerton",
    "Elbrecht": "Saffir",
    "Kovantia": "Duskmere",
    "Lirandel": "Porthallow",
    "Ashgrove Isles": "Wenmark",
    "Ferrania": "Coldwater",
    "Umbrasia": "Nettlefield",
    "Gallowmere": "Starling Bay",
}

SYSTEM_PROMPTS = [
    "You are a concise assistant.",
    "You are a helpful assistant. Answer in one short sentence.",
    "You are a precise assistant that answers briefly.",
]

# (from-unit, to-unit, factor)
CONVERSIONS = [
    ("kilometers", "meters", 1000),
    ("hours", "minutes", 60),
    ("kilograms", "grams", 1000),
    ("minutes", "seconds", 60),
]

Label = dict[str, list[str]]
LABELS: dict[str, Label] = {
    "arithmetic": {
        "ability_en": ["mathematical calculation"],
        "ability_zh": ["数学计算"],
        "cate_ability_en": ["mathematical ability"],
        "cate_ability_zh": ["数学能力"],
    },
    "conversion": {
        "ability_en": ["unit conversion", "mathematical calculation"],
        "ability_zh": ["单位转换", "数学计算"],
        "cate_ability_en": ["mathematical ability"],
        "cate_ability_zh": ["数学能力"],
    },
    "capital": {
        "ability_en": ["geographic knowledge", "knowledge question and answer"],
        "ability_zh": ["地理知识", "知识问答"],
        "cate_ability_en": ["open knowledge q&a"],
        "cate_ability_zh": ["开放知识问答"],
    },
}

QA = tuple[str, str, str]  # (task, question, answer)


def arithmetic_qa(rng: random.Random) -> QA:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        result = a * b
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b
    expr = f"{a} {op} {b}"
    question = rng.choice([f"What is {expr}?", f"Compute {expr}.", f"Calculate {expr}."])
    return "arithmetic", question, f"{expr} = {result}."


def conversion_qa(rng: random.Random) -> QA:
    src, dst, factor = rng.choice(CONVERSIONS)
    n = rng.randint(2, 20)  # >= 2 keeps every unit name plural
    question = rng.choice([f"How many {dst} are in {n} {src}?", f"Convert {n} {src} to {dst}."])
    return "conversion", question, f"{n} {src} is {n * factor} {dst}."


def capital_qa(rng: random.Random) -> QA:
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice(
        [
            f"What is the capital of {country}?",
            f"Which city is the capital of {country}?",
            f"Name the capital of {country}.",
        ]
    )
    return "capital", question, f"The capital of {country} is {CAPITALS[country]}."


GENERATORS: list[Callable[[random.Random], QA]] = [arithmetic_qa, conversion_qa, capital_qa]


def merge_labels(tasks: list[str]) -> Label:
    """Union the labels of every task in a row, keeping first-seen order like the real data."""
    merged: Label = {key: [] for key in LABELS["arithmetic"]}
    for task in tasks:
        for key, values in LABELS[task].items():
            merged[key].extend(v for v in values if v not in merged[key])
    return merged


def make_rows(seed: int = DATA_SEED, num_rows: int = NUM_ROWS) -> list[dict[str, Any]]:
    """Generate rows in BAAI/Infinity-Instruct's schema (from/value turns, system/human/gpt roles)."""
    rng = random.Random(seed)
    rows = []
    for row_id in range(num_rows):
        conversations: list[dict[str, str]] = []
        if rng.random() < SYSTEM_FRACTION:
            conversations.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
        num_turns = 2 if rng.random() < TWO_TURN_FRACTION else 1
        tasks = []
        for _ in range(num_turns):
            task, question, answer = rng.choice(GENERATORS)(rng)
            tasks.append(task)
            conversations.append({"from": "human", "value": question})
            conversations.append({"from": "gpt", "value": answer})
        rows.append(
            {
                "id": row_id,
                "conversations": conversations,
                "label": merge_labels(tasks),
                "langdetect": "en",
                "source": SOURCE,
            }
        )
    return rows


FORMAT_SEED = 4321
FORMAT_ROWS = 60
WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city of the invented map",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                               "required": ["city"]}}


def format_samples(seed: int = FORMAT_SEED, num_rows: int = FORMAT_ROWS) -> dict[str, list[dict[str, Any]]]:
    """The same kinds of questions in each built-in format's shape (as LLaMA-Factory and TRL lay them out), with a
    few rows that are not usable, as real files have (an unknown speaker, an empty answer)."""
    rng = random.Random(seed)
    qas = [rng.choice(GENERATORS)(rng) for _ in range(num_rows)]
    cities = sorted(CAPITALS.values())
    alpaca, sharegpt_tools, messages, prompt_completion, text = [], [], [], [], []
    for index, (_, question, answer) in enumerate(qas):
        alpaca.append({"instruction": question, "input": "", "output": answer}
                      if index % 4 else {"instruction": "Answer in one sentence.", "input": question, "output": answer})
        city = cities[index % len(cities)]
        degrees = rng.randint(-5, 30)
        sharegpt_tools.append({
            "conversations": [
                {"from": "human", "value": f"What is the weather in {city}?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
                {"from": "observation", "value": json.dumps({"city": city, "degrees": degrees})},
                {"from": "gpt", "value": f"It is {degrees} degrees in {city}."},
            ] if index % 3 else [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "tools": json.dumps([WEATHER_TOOL]) if index % 3 else "",
        })
        messages.append({"messages": [*([{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if index % 5 == 0
                                        else []),
                                      {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        prompt_completion.append({"prompt": f"Question: {question}\nAnswer: ", "completion": answer})
        text.append({"text": f"{question} {answer} " * (1 + index % 3)})
    messages[13]["messages"][-1]["role"] = "narrator"  # not a role any template renders: an invalid row
    alpaca[29]["output"] = "   "  # an empty answer: an invalid row
    return {"alpaca.jsonl": alpaca, "sharegpt-tools.jsonl": sharegpt_tools, "messages.jsonl": messages,
            "prompt-completion.jsonl": prompt_completion, "text.jsonl": text}


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def chat_template() -> str:
    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    return [{"role": roles[turn["from"]], "content": turn["value"]} for turn in row["conversations"]]


def training_corpus(rows: list[dict[str, Any]], template: str) -> Iterator[str]:
    """Render rows through the chat template so role headers and the default system prompt get merges.

    At encode time the special tokens are cut out before BPE runs, so the corpus
    is the text between them, exactly the pieces the tokenizer will later see.
    """
    compiled = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    special = re.compile("|".join(re.escape(t) for t in (EOS, IM_START, IM_END)))
    for row in rows:
        rendered = compiled.render(messages=to_messages(row), tools=None, add_generation_prompt=False)
        yield from (piece for piece in special.split(rendered) if piece)


def build_tokenizer(rows: list[dict[str, Any]], template: str) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with Qwen2's normalizer, pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(rows, template), trainer=trainer)
    tok.add_special_tokens([EOS, IM_START, IM_END])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=112,  # 128 overshoots the ~3 MB budget for the committed weights
        intermediate_size=336,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # Qwen2.5 base uses <|endoftext|> for bos, eos and padding.
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(MODEL_SEED)
    return Qwen2ForCausalLM(config).to(torch.float32)


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Stop on <|im_end|> (chat turns) or <|endoftext|> (raw text), like Qwen2.5-Instruct."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    return GenerationConfig(
        bos_token_id=eos_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), eos_id],
        pad_token_id=eos_id,
    )


def verify(model_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Reload from disk and fail loudly if the tokenizer does not behave like Qwen2.5's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    expected = f"{IM_START}system\n{QWEN_DEFAULT_SYSTEM}{IM_END}\n{IM_START}user\nHi{IM_END}\n"
    assert rendered == expected, rendered
    for row in rows[:50]:
        text = tokenizer.apply_chat_template(to_messages(row), tokenize=False)
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="root of the embedded assets")
    args = parser.parse_args()

    rows = make_rows()
    write_jsonl(rows, args.out / DATASET_DIR / "train.jsonl")
    for name, samples in format_samples().items():
        write_jsonl(samples, args.out / FORMATS_DIR / name)

    template = chat_template()
    tokenizer = build_tokenizer(rows, template)
    model = build_model(tokenizer)
    model_dir = args.out / MODEL_DIR
    shutil.rmtree(model_dir, ignore_errors=True)  # no stale files from an older layout
    tokenizer.save_pretrained(model_dir)
    model.save_pretrained(model_dir)
    generation_config(tokenizer).save_pretrained(model_dir)
    verify(model_dir, rows)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {len(rows)} rows and a {n_params:,}-parameter model (vocab {len(tokenizer)}) to {args.out}")


if __name__ == "__main__":
    main()
