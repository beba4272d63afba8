"""Constrained decoding: a JSON schema or a regular expression -> a byte automaton -> the tokens allowed next.

    dfa = compile_pattern(json_schema_pattern({"type": "object", "properties": {"n": {"type": "integer"}}}))
    constraint = Constraint(dfa, Vocabulary(tokenizer, model_vocab_size))
    mask = constraint.allowed(state, budget, stop_ids)   # (vocab,) bool; then state = constraint.advance(state, t)

1. A pattern. Both front ends build the same small tree: ("lit", bytes), ("set", character ranges), ("seq", parts),
   ("alt", options), ("rep", part, min, max or None). `parse_regex` reads a regular expression with Python's own
   parser (no backreferences or lookaround: those are not regular), `json_schema_pattern` a JSON schema, written
   out the way json.dumps writes it, with at most one space after ":" and "," and the properties in schema order.
2. An automaton. The tree becomes an NFA over *bytes* (Thompson's construction; a set of characters becomes the
   alternatives of its UTF-8 byte sequences) and subset construction makes that a DFA: a (states + 1, 256) table
   of next states whose last row is the dead state, the accepting states, and each state's distance in bytes to
   the nearest accepting state. The automaton reads characters, but in their bytes, so a character whose bytes a
   BPE token splits ("é" = C3 A9 over two tokens) needs no special case: the state between the bytes is a state.
3. Token masks. A token is allowed in state s if walking its bytes from s does not reach the dead state. A trie
   over the vocabulary, built once per tokenizer, shares the walk of common prefixes; it is walked one depth at a
   time, every node of a depth in one numpy gather. Each token's end state is cached per DFA state, so a state
   costs one walk however often it recurs. Stop tokens (EOS) are allowed in accepting states only.

Always finishing. A schema may allow unbounded strings and a model may never close one; but every byte is a token
of a byte-level BPE vocabulary, so a state d bytes from acceptance can be finished in d tokens. A token is
therefore allowed only if its end state is at most (tokens left after it) bytes from acceptance: a constrained
output always ends complete, provided max_tokens covers the shortest match (`Constraint.min_tokens`).

Bounds: the NFA and the DFA have at most MAX_STATES states each (PatternError beyond), the mask cache at most
MASK_CACHE_BYTES; compiling is pure Python, so the server runs it off the event loop.
"""
import json
import re
from collections import deque

import numpy as np

try:
    from re import _parser as sre_parser  # Python >= 3.11
except ImportError:
    import sre_parse as sre_parser  # Python 3.10

MAX_STATES = 20_000
MASK_CACHE_BYTES = 64 << 20
JSON_ANY_DEPTH = 3                          # nesting levels of a JSON value whose schema is {} or "json_object"
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs", "definitions"}


class PatternError(ValueError):
    """A pattern or schema that is malformed, unsupported or too large; `pointer` is the JSON pointer to blame."""

    def __init__(self, message: str, pointer: str | None = None):
        super().__init__(message if pointer is None else f"{message} (at '{pointer or '/'}')")
        self.pointer = pointer


# ----------------------------------------------------------------------------------------------------------
# 1. Patterns

def lit(text: str):
    return ("lit", text.encode())


def seq(*parts):
    return ("seq", parts)


def alt(*options):
    return ("alt", options)


def rep(part, low=0, high=None):
    return ("rep", part, low, high)


def char_set(ranges, negate=False):
    """A set of characters from (low, high) code point ranges (or all the others, negated)."""
    merged = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    if negate:
        edges = [-1] + [x for low, high in merged for x in (low, high)] + [0x110000]
        merged = [(a + 1, b - 1) for a, b in zip(edges[::2], edges[1::2]) if a + 1 <= b - 1]
    return ("set", tuple(merged))


def ascii_set(chars: str, negate=False):
    return char_set([(ord(c), ord(c)) for c in chars], negate)


DIGIT, WORD = char_set([(48, 57)]), char_set([(48, 57), (65, 90), (95, 95), (97, 122)])
SPACE = ascii_set(" \t\n\r\f\v")
CATEGORIES = {"CATEGORY_DIGIT": DIGIT, "CATEGORY_WORD": WORD, "CATEGORY_SPACE": SPACE}  # ASCII, as in JSON Schema


def parse_regex(pattern: str):
    """The pattern tree of a regular expression, matched whole (^ $ \\A \\Z at its ends change nothing).

    Python's own parser reads it (re._parser: re's syntax, escapes and errors exactly); the tree is then taken
    apart into ours. Literals, classes, ".", groups, alternation and greedy or lazy repetition are regular; what is
    not - backreferences, lookaround, word boundaries, possessive repeats, flags - is refused."""
    try:
        parsed = sre_parser.parse(pattern)
    except re.error as error:
        raise PatternError(f"regex {pattern!r}: {error}") from None
    if parsed.state.flags & ~re.UNICODE:
        raise PatternError(f"regex {pattern!r}: flags like (?i) are not supported")
    return _from_sre(pattern, list(parsed), True, True)


def _from_sre(pattern: str, items: list, at_start: bool, at_end: bool):
    parts = []
    for i, (op, arg) in enumerate(items):
        op, first, last = str(op), at_start and i == 0, at_end and i == len(items) - 1
        if op == "LITERAL":
            parts.append(lit(chr(arg)))
        elif op == "NOT_LITERAL":
            parts.append(char_set([(arg, arg)], negate=True))
        elif op == "ANY":
            parts.append(ascii_set("\n", negate=True))
        elif op == "IN":
            parts.append(_sre_class(pattern, arg))
        elif op == "BRANCH":
            parts.append(alt(*[_from_sre(pattern, list(option), first, last) for option in arg[1]]))
        elif op == "SUBPATTERN" and not arg[1] and not arg[2]:  # a group without inline flags
            parts.append(_from_sre(pattern, list(arg[3]), first, last))
        elif op in ("MAX_REPEAT", "MIN_REPEAT"):  # greedy or lazy: the same strings match
            low, high, part = arg
            parts.append(rep(_from_sre(pattern, list(part), False, False), low,
                             None if high == sre_parser.MAXREPEAT else high))
        elif not (op == "AT" and ((first and str(arg) in ("AT_BEGINNING", "AT_BEGINNING_STRING"))
                                  or (last and str(arg) in ("AT_END", "AT_END_STRING")))):
            raise PatternError(f"regex {pattern!r}: {op} {str(arg)[:40]} (a backreference, lookaround, assertion, "
                               f"possessive repeat or flag) is not supported")
    return seq(*parts)


def _sre_class(pattern: str, items: list):
    negate = bool(items) and str(items[0][0]) == "NEGATE"
    ranges = []
    for op, arg in items[negate:]:
        op = str(op)
        if op in ("LITERAL", "RANGE"):
            ranges.append((arg, arg) if op == "LITERAL" else arg)
        elif op == "CATEGORY" and str(arg).replace("_NOT", "") in CATEGORIES:
            node = CATEGORIES[str(arg).replace("_NOT", "")]
            ranges += char_set(node[1], negate=True)[1] if "_NOT" in str(arg) else node[1]
        else:
            raise PatternError(f"regex {pattern!r}: {op} {str(arg)[:40]} in a class is not supported")
    return char_set(ranges, negate)


# JSON text, written as json.dumps writes it (one optional space after ":" and ","), strings with every escape.
JSON_STRING_CHAR = alt(char_set([(0, 0x1F), (ord('"'), ord('"')), (ord("\\"), ord("\\"))], negate=True),
                       seq(lit("\\"), ascii_set('"\\/bfnrt')),
                       seq(lit("\\u"), rep(char_set([(48, 57), (65, 70), (97, 102)]), 4, 4)))
JSON_STRING = seq(lit('"'), rep(JSON_STRING_CHAR), lit('"'))
JSON_INTEGER = seq(rep(lit("-"), 0, 1), alt(lit("0"), seq(char_set([(49, 57)]), rep(DIGIT))))
JSON_NUMBER = seq(JSON_INTEGER, rep(seq(lit("."), rep(DIGIT, 1)), 0, 1),
                  rep(seq(ascii_set("eE"), rep(ascii_set("+-"), 0, 1), rep(DIGIT, 1)), 0, 1))
COLON, COMMA = seq(lit(":"), rep(lit(" "), 0, 1)), seq(lit(","), rep(lit(" "), 0, 1))
SCALARS = {"string": JSON_STRING, "integer": JSON_INTEGER, "number": JSON_NUMBER,
           "boolean": alt(lit("true"), lit("false")), "null": lit("null")}


JSON_TYPES = [*SCALARS, "object", "array"]


def json_type(value) -> str:
    """The JSON Schema type of a parsed JSON value."""
    if isinstance(value, bool) or value is None:
        return "null" if value is None else "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def json_list(item, low=0, high=None):
    """`[item, item, ...]` with low..high items (the same shape gives objects their members)."""
    if high == 0:
        return lit("[]")
    items = seq(item, rep(seq(COMMA, item), max(low - 1, 0), None if high is None else high - 1))
    return seq(lit("["), items if low else rep(items, 0, 1), lit("]"))


def json_any(depth=JSON_ANY_DEPTH, kind=None):
    """Any JSON value (or, with kind "object", any object) nested at most `depth` levels."""
    inner = json_any(depth - 1) if depth else None
    member = None if inner is None else seq(JSON_STRING, COLON, inner)
    obj = lit("{}") if member is None else seq(lit("{"), rep(seq(member, rep(seq(COMMA, member))), 0, 1), lit("}"))
    if kind == "object":
        return obj
    return alt(*SCALARS.values(), *([] if inner is None else [obj, json_list(inner)]))


def json_schema_pattern(schema, root=None, pointer="", refs=()):
    """The pattern of the JSON texts valid under `schema`, from this subset of JSON Schema: type (one or a list)
    object (properties, required, additionalProperties false), array (items, minItems, maxItems), string
    (minLength, maxLength), integer, number, boolean, null; enum, const, anyOf, local $ref ("#/$defs/..."), and
    annotations (title, description, ...). Anything else is a PatternError naming its JSON pointer."""
    root = schema if root is None else root
    if schema == {} or schema is True:
        return json_any()
    if not isinstance(schema, dict):
        raise PatternError(f"a schema must be an object, got {json.dumps(schema)[:60]}", pointer)
    known = ANNOTATIONS | {"type", "enum", "const", "anyOf", "$ref", "properties", "required", "additionalProperties",
                           "items", "minItems", "maxItems", "minLength", "maxLength"}
    for key in schema:
        if key not in known:
            raise PatternError(f"the keyword {key!r} is not supported", f"{pointer}/{key}")
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types
    if types is not None and (not isinstance(types, list) or not types or any(t not in JSON_TYPES for t in types)):
        raise PatternError(f"type must be one or a list of {JSON_TYPES}, got {json.dumps(types)[:60]}",
                           f"{pointer}/type")
    alone = [key for key in ("$ref", "anyOf", "enum", "const") if key in schema]  # each decides the whole value
    others = set(schema) - ANNOTATIONS - {*alone[:1], *(["type"] if alone[:1] in (["enum"], ["const"]) else [])}
    if alone and others:
        raise PatternError(f"{alone[0]} beside {sorted(others)} is not supported", f"{pointer}/{alone[0]}")
    if "$ref" in schema:
        ref = schema["$ref"]
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        target = (root.get(match[1]) or {}).get(match[2]) if match else None
        if target is None:
            raise PatternError(f"$ref {ref!r} does not name a schema under #/$defs", f"{pointer}/$ref")
        if ref in refs:
            raise PatternError(f"$ref {ref!r} is recursive; recursive schemas are not supported", f"{pointer}/$ref")
        return json_schema_pattern(target, root, ref[1:], (*refs, ref))
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if isinstance(values, list) and types:  # only the values of the type(s)
            values = [v for v in values if json_type(v) in types or (json_type(v) == "integer" and "number" in types)]
        if not isinstance(values, list) or not values:
            raise PatternError("enum must be a non-empty list (of values of the schema's type)", f"{pointer}/enum")
        return alt(*[lit(json.dumps(value, ensure_ascii=False)) for value in values])
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise PatternError("anyOf must be a non-empty list of schemas", f"{pointer}/anyOf")
        return alt(*[json_schema_pattern(s, root, f"{pointer}/anyOf/{i}", refs) for i, s in enumerate(options)])
    if types is None:
        return json_any()

    def count(key):
        value = schema.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise PatternError(f"{key} must be a count >= 0, got {json.dumps(value)[:60]}", f"{pointer}/{key}")
        return value

    def one(kind):
        if kind == "string":
            return seq(lit('"'), rep(JSON_STRING_CHAR, count("minLength") or 0, count("maxLength")), lit('"'))
        if kind == "array":
            item = json_schema_pattern(schema.get("items", {}), root, f"{pointer}/items", refs)
            return json_list(item, count("minItems") or 0, count("maxItems"))
        if kind == "object":
            return object_pattern(schema, root, pointer, refs)
        return SCALARS[kind]
    return alt(*[one(kind) for kind in types])


def object_pattern(schema, root, pointer, refs):
    """`{"a": ..., "b": ...}`: the properties in the schema's order, the required ones always, the others optional."""
    properties, required = schema.get("properties", {}), schema.get("required", [])
    extra = schema.get("additionalProperties")
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise PatternError("properties must be an object and required a list", f"{pointer}/properties")
    missing = [name for name in required if name not in properties]
    if missing:
        raise PatternError(f"required names {missing} that are not in properties", f"{pointer}/required")
    if not properties and extra is not False:
        return json_any(kind="object")
    if extra not in (None, False):
        raise PatternError("additionalProperties must be false (or absent) beside properties",
                           f"{pointer}/additionalProperties")
    members = [(seq(lit(json.dumps(name, ensure_ascii=False)), COLON,
                    json_schema_pattern(sub, root, f"{pointer}/properties/{name}", refs)), name in required)
               for name, sub in properties.items()]
    # Commas go between the properties present: branch on which property comes first.
    firsts = []
    for i, (member, is_required) in enumerate(members):
        rest = [seq(COMMA, m) if r else rep(seq(COMMA, m), 0, 1) for m, r in members[i + 1:]]
        firsts.append(seq(member, *rest))
        if is_required:
            break
    else:
        firsts.append(seq())
    return seq(lit("{"), alt(*firsts), lit("}"))


# ----------------------------------------------------------------------------------------------------------
# 2. Automata

def utf8_ranges(low: int, high: int):
    """Byte-range sequences [(first byte low, high), ...] whose strings are the UTF-8 of code points low..high
    (surrogates, U+D800..U+DFFF, are not characters and have no UTF-8)."""
    for top in (0x7F, 0x7FF, 0xD7FF, 0xDFFF, 0xFFFF, 0x10FFFF):
        if low <= min(high, top) and top != 0xDFFF:
            yield from _same_length_ranges(low, min(high, top))
        low = max(low, top + 1)


def _same_length_ranges(low, high):
    # Split until every byte position ranges independently (the method of RE2 and Rust's regex-syntax).
    for i in range(1, len(chr(low).encode())):
        tail = (1 << (6 * i)) - 1  # the code point bits of the last i bytes
        if low & ~tail != high & ~tail:
            if low & tail:
                yield from _same_length_ranges(low, low | tail)
                yield from _same_length_ranges((low | tail) + 1, high)
                return
            if high & tail != tail:
                yield from _same_length_ranges(low, (high & ~tail) - 1)
                yield from _same_length_ranges(high & ~tail, high)
                return
    yield list(zip(chr(low).encode(), chr(high).encode()))


class Automaton:
    """A DFA over bytes: `table` (states + 1, 256) of next states (the last row is the dead state), `accepting`,
    `distance` (bytes to the nearest accepting state; a large number where none is reachable). Start state 0."""

    def __init__(self, table: np.ndarray, accepting: np.ndarray):
        self.table, self.accepting = table, accepting
        self.dead = len(table) - 1
        num_states = len(table)
        # Edges (source -> target) as target * num_states + source, unique and sorted by target.
        pairs = np.unique(table.astype(np.int64).ravel() * num_states + np.repeat(np.arange(num_states), 256))
        sources, first = pairs % num_states, np.searchsorted(pairs // num_states, np.arange(num_states + 1))
        distance = [None] * num_states
        frontier = deque(np.flatnonzero(accepting).tolist())
        for state in frontier:
            distance[state] = 0
        while frontier:  # breadth first, backwards from the accepting states
            state = frontier.popleft()
            for source in sources[first[state]:first[state + 1]].tolist():
                if distance[source] is None and source != self.dead:
                    distance[source] = distance[state] + 1
                    frontier.append(source)
        unreachable = np.iinfo(np.int32).max // 2
        self.distance = np.array([unreachable if d is None else d for d in distance], dtype=np.int32)

    def walk(self, state: int, data: bytes) -> int:
        """The state after reading `data` from `state` (the dead state once no match can follow)."""
        for byte in data:
            state = self.table[state, byte]
        return int(state)


def compile_pattern(tree, max_states: int = MAX_STATES) -> Automaton:
    """The DFA of a pattern tree: Thompson's NFA over bytes, then subset construction (PatternError past max_states)."""
    edges, epsilons = [], []  # per NFA state: [(low byte, high byte, target)], [targets]

    def new_state():
        if len(edges) >= max_states:
            raise PatternError(f"the pattern needs more than {max_states} automaton states; simplify it")
        edges.append([])
        epsilons.append([])
        return len(edges) - 1

    def build(node, start):  # adds the node's fragment after `start`; returns its end state
        kind = node[0]
        if kind == "lit":
            for byte in node[1]:
                state = new_state()
                edges[start].append((byte, byte, state))
                start = state
            return start
        if kind == "set":
            end = new_state()
            for low, high in node[1]:
                for byte_ranges in utf8_ranges(low, high):
                    state = start
                    for byte_low, byte_high in byte_ranges[:-1]:
                        state_next = new_state()
                        edges[state].append((byte_low, byte_high, state_next))
                        state = state_next
                    edges[state].append((*byte_ranges[-1], end))
            return end
        if kind == "seq":
            for part in node[1]:
                start = build(part, start)
            return start
        if kind == "alt":
            end = new_state()
            for option in node[1]:
                head = new_state()
                epsilons[start].append(head)
                epsilons[build(option, head)].append(end)
            return end
        part, low, high = node[1:]
        for _ in range(low):
            start = build(part, start)
        if high is None:  # a loop: from its head, one more part returns to the head
            head = new_state()
            epsilons[start].append(head)
            epsilons[build(part, head)].append(head)
            return head
        end = new_state()
        for _ in range(high - low):
            epsilons[start].append(end)
            start = build(part, start)
        epsilons[start].append(end)
        return end

    accept = build(tree, new_state())

    def closure(states):
        seen, stack = set(states), list(states)
        while stack:
            for target in epsilons[stack.pop()]:
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return frozenset(seen)

    ids, rows, queue = {}, [], deque()

    def dfa_state(nfa_states):
        if nfa_states not in ids:
            if len(ids) >= max_states:
                raise PatternError(f"the pattern needs more than {max_states} automaton states; simplify it")
            ids[nfa_states] = len(ids)
            queue.append(nfa_states)
        return ids[nfa_states]

    dfa_state(closure([0]))
    while queue:
        nfa_states = queue.popleft()
        moves = [edge for state in nfa_states for edge in edges[state]]
        row = np.full(256, -1, dtype=np.int32)
        cuts = sorted({low for low, _, _ in moves} | {high + 1 for _, high, _ in moves})
        for low, high in zip(cuts, cuts[1:]):  # bytes low..high-1 all lead to the same NFA states
            targets = [target for l, h, target in moves if l <= low and high - 1 <= h]
            if targets:
                row[low:high] = dfa_state(closure(targets))
        rows.append(row)
    table = np.stack(rows + [np.full(256, -1, dtype=np.int32)])
    table[table < 0] = len(rows)  # the dead state: the extra last row, which leads to itself
    accepting = np.array([accept in states for states in ids] + [False])
    return Automaton(table, accepting)


# ----------------------------------------------------------------------------------------------------------
# 3. Token masks

class Vocabulary:
    """A tokenizer's tokens as a trie of byte prefixes, in arrays laid out for walking it one depth at a time:
    node 0 is the empty prefix, nodes are sorted by depth, `parent` and `byte` say how each extends its parent,
    `token_node[id]` is the node spelling token `id` (-1 for special tokens and ids past the tokenizer's)."""

    def __init__(self, tokenizer, vocab_size: int):
        tokens = [(data, token_id) for data, token_id in tokenizer.vocabulary() if token_id < vocab_size]
        prefixes = sorted({data[:i] for data, _ in tokens for i in range(len(data) + 1)}, key=lambda p: (len(p), p))
        node_of = {prefix: i for i, prefix in enumerate(prefixes)}
        self.vocab_size = vocab_size
        self.parent = np.array([0] + [node_of[p[:-1]] for p in prefixes[1:]], dtype=np.int64)
        self.byte = np.array([0] + [p[-1] for p in prefixes[1:]], dtype=np.int64)
        depth_starts = np.searchsorted([len(p) for p in prefixes], np.arange(1, len(prefixes[-1]) + 2))
        self.depths = list(zip(depth_starts[:-1].tolist(), depth_starts[1:].tolist()))  # node ranges per depth
        self.token_node = np.full(vocab_size, -1, dtype=np.int64)
        for data, token_id in tokens:
            self.token_node[token_id] = node_of[data]

    def end_states(self, automaton: Automaton, state: int) -> np.ndarray:
        """Each token's state after walking its bytes from `state` (the dead state for special tokens)."""
        states = np.empty(len(self.parent) + 1, dtype=np.int32)  # one more slot: where tokens without bytes end
        states[0], states[-1] = state, automaton.dead
        for start, end in self.depths:
            states[start:end] = automaton.table[states[self.parent[start:end]], self.byte[start:end]]
        return states[self.token_node]  # -1 picks the last slot


class Constraint:
    """A compiled pattern over a vocabulary, shared by every request that uses it; each request keeps its own
    state (an int, starting at `start`) and moves it with `advance`."""
    start = 0

    def __init__(self, automaton: Automaton, vocabulary: Vocabulary):
        self.automaton, self.vocabulary = automaton, vocabulary
        self.cache: dict[int, tuple] = {}
        self.cache_size = max(16, MASK_CACHE_BYTES // (9 * vocabulary.vocab_size))
        self.min_tokens = int(automaton.distance[0])  # the shortest match, one byte token at a time

    def _walk(self, state: int) -> tuple:
        """(each token's end state, its distance to acceptance, the tokens that can finish at all, the largest such
        distance) from `state`, cached."""
        if state not in self.cache:
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))  # the oldest entry
            end = self.vocabulary.end_states(self.automaton, state)
            distance = self.automaton.distance[end]
            viable = distance < self.automaton.distance[self.automaton.dead]
            self.cache[state] = end, distance, viable, int(distance[viable].max(initial=0))
        return self.cache[state]

    def allowed(self, state: int, budget: int, stop_ids) -> np.ndarray:
        """(vocab,) bool: the tokens that keep the output a prefix of a match which the `budget` tokens left
        (this one included) can still finish; the stop ids too where the output so far is a whole match."""
        _, distance, viable, farthest = self._walk(state)
        allowed = viable.copy() if farthest <= budget - 1 else distance <= budget - 1
        if self.automaton.accepting[state]:
            allowed[[t for t in stop_ids if t < len(allowed)]] = True
        return allowed

    def complete(self, state: int) -> bool:
        """The output is a whole match that no byte can extend: nothing but a stop token may follow."""
        return bool(self.automaton.accepting[state] and (self.automaton.table[state] == self.automaton.dead).all())

    def advance(self, state: int, token: int) -> int:
        """The state after `token` (a stop token leaves it as it is)."""
        end = int(self._walk(state)[0][token])
        return state if end == self.automaton.dead and self.automaton.accepting[state] else end
