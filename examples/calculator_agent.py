"""An agent loop: the model calls a calculator tool, gets the result back, and answers.

    python serve.py &
    python examples/calculator_agent.py --base-url http://127.0.0.1:8000/v1 "What is 12.5 times 4?"

The first turn forces a tool call (tool_choice="required"): the server constrains the reply to a call whose
arguments match the tool's schema, so even a small model's call parses. Later turns leave the choice to the model.
"""
import argparse
import json
import operator

from openai import OpenAI

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
TOOLS = [{"type": "function", "function": {
    "name": "calculate", "description": "Apply an arithmetic operation to two numbers.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "op", "b"], "properties": {
        "a": {"type": "number"}, "op": {"enum": list(OPERATIONS)}, "b": {"type": "number"}}}}}]


def calculate(a: float, op: str, b: float) -> str:
    try:
        return str(OPERATIONS[op](a, b))
    except (ArithmeticError, OverflowError) as error:
        return f"error: {error}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="What is 12.5 times 4?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--max-turns", type=int, default=3)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    messages = [{"role": "user", "content": args.question}]
    for turn in range(args.max_turns):
        reply = client.chat.completions.create(model="nanostack", messages=messages, tools=TOOLS, max_tokens=160,
                                               tool_choice="required" if turn == 0 else "auto", temperature=0)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            print(f"answer: {message.content}")
            break
        for call in message.tool_calls:
            result = calculate(**json.loads(call.function.arguments))
            print(f"tool call: {call.function.name}({call.function.arguments}) = {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})


if __name__ == "__main__":
    main()
