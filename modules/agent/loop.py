"""The ReAct loop: Thought -> Action -> Observation, repeated until a Final Answer or a guard stops it.

    trajectory  tau = (x, t_1, a_1, o_1, ..., t_n, a_n = finish)     the state is everything so far
    one turn    the model writes one line: "Thought: ... Action: <tool> {json args}"
                                        or "Thought: ... Final Answer: <answer>"
    runtime     parse + schema-check the action, run the tool, append "Observation: <result>"
    guards      a step limit, and a repeated (tool, args) pair stops the episode with a stated reason

Model text is data, never code: an action is parsed with json.loads against the tool's schema, and
the calculator evaluates a whitelisted arithmetic AST (it never calls eval or exec). Unknown tools,
malformed actions and tool errors come back as an ``Observation: error: ...`` the model can react to.

Builds on: nothing (pure Python); task.py trains the tiny Llama of modules.transformer to drive it.
Deviations from ReAct's prompts: a Thought and its Action share one line (the model's turn ends at
its newline, which is also the stop sequence); the tools are three toys.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = [
    "THOUGHT", "ACTION", "OBSERVATION", "FINAL", "QUESTION", "STOP_REASONS",
    "ToolError", "Tool", "calculate", "CALC_LIMITS", "KnowledgeTable", "CardIndex", "load_card_texts",
    "make_tools", "schemas_of", "parse_action", "react_step", "new_state", "run_episode",
    "render_trajectory", "observations_of", "model_turns_of", "EXECUTED",
]

QUESTION, THOUGHT, ACTION, OBSERVATION, FINAL = "Question: ", "Thought: ", "Action: ", "Observation: ", "Final Answer: "
STOP_REASONS = ("final_answer", "step_limit", "repeated_action")
EXECUTED: list = []  # a canary: an attack string that gets executed appends to it; it must stay empty


class ToolError(Exception):
    """A tool refused its arguments or failed; the loop turns it into an error Observation."""


@dataclass(frozen=True)
class Tool:
    """A callable tool and its argument schema: {argument name: "string" | "number"}."""

    name: str
    fn: Callable[..., str]
    schema: dict[str, str]
    description: str = ""


# ---------------------------------------------------------------------------------------------------
# The calculator: an AST whitelist, evaluated by hand


CALC_LIMITS = {"max_chars": 200, "max_depth": 32, "max_abs": 1e15, "max_exponent": 64}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _depth(node: ast.AST) -> int:
    """Nesting depth of an already-whitelisted tree, iteratively (no recursion to blow up)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        n, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in ast.iter_child_nodes(n))
    return deepest


def _whitelisted(tree: ast.AST) -> None:
    """Refuse every node that is not a number, + - * / // % ** or a sign: no names, calls, attributes,
    subscripts, strings, comprehensions, lambdas; bools are not numbers here."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp)):
            if isinstance(node, ast.BinOp) and type(node.op) not in _BINARY:
                raise ToolError(f"operator {type(node.op).__name__} is not allowed")
            if isinstance(node, ast.UnaryOp) and type(node.op) not in _UNARY:
                raise ToolError(f"operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.Constant):
            if type(node.value) not in (int, float):
                raise ToolError(f"only numbers are allowed, not {type(node.value).__name__}")
        elif not isinstance(node, ast.operator | ast.unaryop):
            raise ToolError(f"{type(node).__name__} is not arithmetic")


def _apply(op: ast.AST, a: float, b: float | None = None) -> float:
    if isinstance(op, ast.Pow):
        if abs(b) > CALC_LIMITS["max_exponent"] or (a != 0 and abs(b) * math.log10(abs(a)) > 15):
            raise ToolError("exponent too large")
    if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
        raise ToolError("division by zero")
    try:
        value = _UNARY[type(op)](a) if b is None else _BINARY[type(op)](a, b)
    except (ArithmeticError, ValueError) as exc:  # 0 ** -1, float overflow
        raise ToolError(f"arithmetic error ({exc})") from None
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > CALC_LIMITS["max_abs"]:
        raise ToolError("result out of range")
    return value


def _evaluate(tree: ast.Expression) -> float:
    """Post-order evaluation with an explicit stack (the depth is already bounded)."""
    values: list[float] = []
    stack: list[tuple[ast.AST, bool]] = [(tree.body, False)]
    while stack:
        node, expanded = stack.pop()
        if isinstance(node, ast.Constant):
            values.append(node.value)
        elif not expanded:
            stack.append((node, True))
            children = [node.left, node.right] if isinstance(node, ast.BinOp) else [node.operand]
            stack.extend((c, False) for c in reversed(children))
        elif isinstance(node, ast.BinOp):
            b, a = values.pop(), values.pop()
            values.append(_apply(node.op, a, b))
        else:
            values.append(_apply(node.op, values.pop()))
    return values[0]


def _number_text(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"


def calculate(expr: str) -> str:
    """The calculator tool: arithmetic on numbers, e.g. "42*3+5" -> "131". Refuses (ToolError) anything
    else before evaluating any of it, and results beyond CALC_LIMITS."""
    if not isinstance(expr, str) or len(expr) > CALC_LIMITS["max_chars"]:
        raise ToolError(f"expression longer than {CALC_LIMITS['max_chars']} characters")
    if expr.count("(") > CALC_LIMITS["max_depth"]:
        raise ToolError("expression nested too deeply")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ToolError(f"not an arithmetic expression ({type(exc).__name__})") from None
    _whitelisted(tree)
    if _depth(tree) > CALC_LIMITS["max_depth"]:
        raise ToolError("expression nested too deeply")
    return _number_text(_evaluate(tree))


# ---------------------------------------------------------------------------------------------------
# Lookup over a generated table, search over the project's own cards


@dataclass(frozen=True)
class KnowledgeTable:
    """A small generated fact table: entity -> weight (an integer). Drawn per seed by task.py."""

    facts: dict[str, int]

    def lookup(self, key: str) -> str:
        if key not in self.facts:
            raise ToolError(f"no entry {key!r}")
        return str(self.facts[key])


def load_card_texts(cards_dir: str | Path | None = None) -> dict[str, str]:
    """{module: English title + one-liner} of every card, read as YAML data (no llmaudit import)."""
    import yaml

    folder = Path(cards_dir) if cards_dir is not None else Path(__file__).resolve().parents[2] / "cards"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    texts = {}
    for path in sorted(folder.glob("*.yaml")):
        card = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        texts[card["module"]] = f"{card['title']['en']}. {card['one_liner']['en']}"
    return texts


_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class CardIndex:
    """Bag-of-words search: score = sum over query words of idf(word) if the card contains it."""

    texts: dict[str, str]

    def search(self, query: str) -> str:
        words = set(_WORD.findall(query.lower()))
        if not words:
            raise ToolError("empty query")
        docs = {m: set(_WORD.findall(t.lower())) for m, t in self.texts.items()}
        idf = {w: math.log((1 + len(docs)) / (1 + sum(w in d for d in docs.values()))) for w in words}
        scores = {m: sum(idf[w] for w in words & d) for m, d in docs.items()}
        best = max(sorted(scores), key=lambda m: scores[m]) if scores else None
        if best is None or scores[best] <= 0:
            raise ToolError("no card matches")
        return f"{best}: {self.texts[best].split('. ')[0]}"


def make_tools(table: KnowledgeTable, cards: CardIndex | None = None) -> dict[str, Tool]:
    """The tool registry: calc, lookup and (when card texts are given) search."""
    tools = {"calc": Tool("calc", lambda expr: calculate(expr), {"expr": "string"}, "arithmetic on numbers"),
             "lookup": Tool("lookup", lambda key: table.lookup(key), {"key": "string"}, "weight of an entity")}
    if cards is not None:
        tools["search"] = Tool("search", lambda query: cards.search(query), {"query": "string"},
                               "the llmaudit card that best matches a query")
    return tools


def schemas_of(tools: dict[str, Tool]) -> dict[str, dict[str, str]]:
    return {name: tool.schema for name, tool in tools.items()}


# ---------------------------------------------------------------------------------------------------
# Kernels: parse one model turn; advance the state machine by one turn


_TYPES = {"string": str, "number": (int, float)}


def parse_action(text: str, schemas: dict[str, dict[str, str]]) -> dict:
    """Parse one model turn into a schema-checked action. Never raises on model text.

    A turn is one line: "Thought: <free text> Action: <tool> <JSON object>" or
    "Thought: <free text> Final Answer: <answer>" (the Thought is optional).
    schemas: {tool name: {argument name: "string" | "number"}}; the JSON object must have exactly
    those keys with values of those types (bools are not numbers).
    Returns {"kind": "call", "tool": name, "args": dict}, {"kind": "final", "answer": str} or
    {"kind": "error", "error": a short reason} -- for no or two action markers, bad JSON, a JSON
    value that is not an object, an unknown tool, missing/extra arguments or wrong types.
    """
    text = text.strip()
    n_action, n_final = text.count(ACTION.strip()), text.count(FINAL.strip())
    if n_action + n_final != 1:
        return {"kind": "error", "error": "expected exactly one 'Action:' or 'Final Answer:'"}
    if n_final:
        return {"kind": "final", "answer": text.split(FINAL.strip(), 1)[1].strip()}
    body = text.split(ACTION.strip(), 1)[1].strip()
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*(.*)", body, flags=re.S)
    if not match:
        return {"kind": "error", "error": "expected a tool name after 'Action:'"}
    name, raw = match.groups()
    if name not in schemas:
        return {"kind": "error", "error": f"unknown tool {name!r}; tools: {', '.join(sorted(schemas))}"}
    try:
        args = json.loads(raw)
    except (ValueError, RecursionError):
        return {"kind": "error", "error": "arguments are not valid JSON"}
    if not isinstance(args, dict):
        return {"kind": "error", "error": "arguments must be a JSON object"}
    schema = schemas[name]
    if set(args) != set(schema):
        return {"kind": "error", "error": f"{name} takes the arguments {sorted(schema)}, got {sorted(args)}"}
    for key, kind in schema.items():
        if isinstance(args[key], bool) or not isinstance(args[key], _TYPES[kind]):
            return {"kind": "error", "error": f"argument {key!r} of {name} must be a {kind}"}
    return {"kind": "call", "tool": name, "args": args}


def new_state(question: str) -> dict:
    """The start of an episode: the question, no steps, not stopped."""
    return {"question": question, "steps": [], "answer": None, "stop": None}


def react_step(state: dict, turn: str, action: dict, tools: dict[str, Tool], max_steps: int) -> dict:
    """One iteration of the ReAct state machine; returns a new state (the input is not modified).

    state:  {"question": str, "steps": [{"turn", "action", "observation"}, ...], "answer": str | None,
             "stop": None | "final_answer" | "step_limit" | "repeated_action"}
    turn:   the model's text for this turn; action: parse_action(turn, schemas)
    - a final action sets answer and stop = "final_answer" (observation None)
    - a call whose (tool, args) equals an earlier step's stops with "repeated_action", unexecuted
    - a valid call runs tools[tool].fn(**args); any exception it raises, and a parse error, become
      the observation "error: <reason>" -- the episode goes on, so the model can correct itself
    - after the step, stop = "step_limit" if len(steps) == max_steps and no other stop was set.
    """
    steps = list(state["steps"])
    answer, stop, observation = None, None, None
    if action["kind"] == "final":
        answer, stop = action["answer"], "final_answer"
    elif action["kind"] == "error":
        observation = f"error: {action['error']}"
    elif any(s["action"] == action for s in steps):
        stop = "repeated_action"
    else:
        try:
            observation = str(tools[action["tool"]].fn(**action["args"]))
        except Exception as exc:  # a tool's failure is data for the model, never a crash of the loop
            observation = f"error: {exc}" if isinstance(exc, ToolError) else f"error: {type(exc).__name__}: {exc}"
    steps.append({"turn": turn, "action": action, "observation": observation})
    if stop is None and len(steps) >= max_steps:
        stop = "step_limit"
    return {**state, "steps": steps, "answer": answer, "stop": stop}


# ---------------------------------------------------------------------------------------------------
# Driving the loop with any policy, and reading trajectories back


def render_trajectory(state: dict) -> str:
    """The context the model reads: the question, then each turn and its observation, one per line."""
    lines = [f"{QUESTION}{state['question']}"]
    for step in state["steps"]:
        lines.append(step["turn"].strip())
        if step["observation"] is not None:
            lines.append(f"{OBSERVATION}{step['observation']}")
    return "\n".join(lines) + "\n"


def run_episode(question: str, policy: Callable[[str], str], tools: dict[str, Tool], max_steps: int, *,
                parse: Callable = parse_action, step: Callable = react_step) -> dict:
    """Ask ``policy`` (context text -> one turn of text) until the state machine stops. The loop runs
    at most max_steps iterations whatever ``step`` returns, so a broken step cannot hang it."""
    state, schemas = new_state(question), schemas_of(tools)
    for _ in range(max_steps):
        turn = policy(render_trajectory(state))
        state = step(state, turn, parse(turn, schemas), tools, max_steps)
        if state["stop"] is not None:
            break
    return state


def model_turns_of(state: dict) -> list[str]:
    return [s["turn"] for s in state["steps"]]


def observations_of(state: dict) -> list[str | None]:
    return [s["observation"] for s in state["steps"]]
