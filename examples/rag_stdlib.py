"""Retrieval-augmented answering over the standard library's documentation (its docstrings, no download).

    python serve.py &
    python examples/rag_stdlib.py --base-url http://127.0.0.1:8000/v1 "How do I turn a dict into a JSON string?"

Chunking: each function's docstring, cut into pieces of at most --chunk-words words. Retrieval two ways: BM25, written
here in numpy, and embeddings from the server's /v1/embeddings (cosine similarity). Both are scored by recall@k on a
small labelled question set; then the best chunks go into a prompt that asks for an answer citing them as [1], [2].
"""
import argparse
import importlib
import inspect
import re

import numpy as np
from openai import OpenAI

MODULES = ["json", "os.path", "math", "re", "shutil", "copy", "time", "random", "base64", "textwrap", "string",
           "itertools", "functools", "statistics", "heapq", "bisect"]
QUESTIONS = [  # (question, the function whose documentation answers it)
    ("How do I serialize an object to a JSON formatted string?", "json.dumps"),
    ("How do I join two path components?", "os.path.join"),
    ("How do I compute a square root?", "math.sqrt"),
    ("How do I compile a regular expression pattern?", "re.compile"),
    ("How do I copy a file to another place?", "shutil.copyfile"),
    ("How do I make a deep copy of an object?", "copy.deepcopy"),
    ("How do I delay execution for a number of seconds?", "time.sleep"),
    ("How do I wrap a paragraph of text into lines?", "textwrap.wrap"),
    ("How do I encode bytes using Base64?", "base64.b64encode"),
    ("How do I find the median of some data?", "statistics.median"),
    ("How do I push an item onto a heap?", "heapq.heappush"),
    ("How do I find the insertion point in a sorted list?", "bisect.bisect_left"),
]


def chunks(max_words: int) -> list[tuple[str, str]]:
    """(source, text) pieces of each public function's docstring, at most max_words words each."""
    pieces = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, function in sorted(vars(module).items()):
            own = callable(function) and not name.startswith("_") and inspect.getmodule(function) is module
            doc = inspect.getdoc(function) if own else None
            words = (doc or "").split()
            for start in range(0, len(words), max_words):
                pieces.append((f"{module_name}.{name}", " ".join(words[start:start + max_words])))
    return pieces


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class BM25:
    """Okapi BM25 (k1, b as usual) over a term-document count matrix."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.vocabulary = {w: i for i, w in enumerate(sorted({w for text in texts for w in words(text)}))}
        counts = np.zeros((len(texts), len(self.vocabulary)))  # (documents, terms)
        for row, text in enumerate(texts):
            np.add.at(counts[row], [self.vocabulary[w] for w in words(text)], 1)
        lengths = counts.sum(1, keepdims=True)
        document_frequency = (counts > 0).sum(0)
        self.idf = np.log(1 + (len(texts) - document_frequency + 0.5) / (document_frequency + 0.5))
        self.weights = counts * (k1 + 1) / (counts + k1 * (1 - b + b * lengths / lengths.mean()))

    def scores(self, query: str) -> np.ndarray:
        terms = [self.vocabulary[w] for w in words(query) if w in self.vocabulary]
        return (self.weights[:, terms] * self.idf[terms]).sum(1)


def embed(client, texts: list[str], batch: int = 64) -> np.ndarray:
    """(len(texts), dim) unit vectors from /v1/embeddings."""
    vectors = []
    for start in range(0, len(texts), batch):
        reply = client.embeddings.create(model="nanostack", input=texts[start:start + batch])
        vectors += [item.embedding for item in reply.data]
    return np.array(vectors)


def recall_at(k: int, rankings: list[np.ndarray], sources: list[str]) -> float:
    """Share of the questions whose answering function is among the sources of its top-k chunks."""
    return float(np.mean([answer in {sources[i] for i in ranking[:k]}
                          for ranking, (_, answer) in zip(rankings, QUESTIONS)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="How do I turn a dict into a JSON string?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--chunk-words", type=int, default=40)
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    sources, texts = zip(*chunks(args.chunk_words))
    bm25, chunk_vectors = BM25(texts), embed(client, list(texts))
    question_vectors = embed(client, [question for question, _ in QUESTIONS])
    rankings = {"bm25": [np.argsort(-bm25.scores(question)) for question, _ in QUESTIONS],
                "embeddings": [np.argsort(-(chunk_vectors @ vector)) for vector in question_vectors]}
    print(f"{len(texts)} chunks from {len(MODULES)} modules; {len(QUESTIONS)} labelled questions")
    for name, ranking in rankings.items():
        print(f"{name:>10}: " + "  ".join(f"recall@{k} {recall_at(k, ranking, sources):.2f}" for k in (1, 5, 20)))

    top = np.argsort(-bm25.scores(args.question))[:args.top_k]
    context = "\n".join(f"[{n}] ({sources[i]}) {texts[i]}" for n, i in enumerate(top, 1))
    prompt = f"Answer from these sources and cite them as [n].\n{context}\n\nQuestion: {args.question}"
    reply = client.chat.completions.create(model="nanostack", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=64, temperature=0)
    print(f"question: {args.question}\nsources: " + ", ".join(f"[{n}] {sources[i]}" for n, i in enumerate(top, 1)))
    print(f"answer: {reply.choices[0].message.content}")


if __name__ == "__main__":
    main()
