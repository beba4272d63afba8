"""Structured extraction: the reply is a JSON object that matches a schema, every time, whatever the model.

    python serve.py &
    python examples/structured_extraction.py --base-url http://127.0.0.1:8000/v1

The openai SDK turns the pydantic model into a strict JSON schema (`response_format`), the server constrains
decoding to it (nanostack/serving/constrained.py), and the SDK parses the reply back into the model.
"""
import argparse

from openai import OpenAI
from pydantic import BaseModel


class Parameter(BaseModel):
    name: str
    has_default: bool


class Function(BaseModel):
    module: str
    name: str
    parameters: list[Parameter]
    returns: str | None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    for question in ["Describe json.dumps(obj, indent=None).", "Describe os.path.join(path, *paths)."]:
        completion = client.chat.completions.parse(
            model="nanostack", messages=[{"role": "user", "content": question}], response_format=Function,
            max_tokens=args.max_tokens, temperature=0)
        function = completion.choices[0].message.parsed  # a Function: the reply matched the schema
        print(f"{question}\n  -> {function!r}")


if __name__ == "__main__":
    main()
