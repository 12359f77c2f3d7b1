"""Agent: the parser, the state machine, the calculator's refusals, the loss mask, the endpoint policy
against a stub server on 127.0.0.1, the audit, and one mutant per check."""
from __future__ import annotations

import ast
import http.server
import itertools
import json
import socket
import threading
import time
from unittest import mock

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.agent import endpoint as E
from modules.agent import loop as L
from modules.agent import task as M

SCHEMAS = {"calc": {"expr": "string"}, "lookup": {"key": "string"}}


# ------------------------------------------------------------------------------------------------
# parse_action


def test_parse_action_reads_calls_and_final_answers():
    assert L.parse_action('Thought: hm. Action: calc {"expr": "1+2"}\n', SCHEMAS) == \
        {"kind": "call", "tool": "calc", "args": {"expr": "1+2"}}
    assert L.parse_action("Thought: ok. Final Answer: 3", SCHEMAS) == {"kind": "final", "answer": "3"}
    assert L.parse_action('Action: calc {"expr": 3}', SCHEMAS)["kind"] == "error"
    assert "unknown tool" in L.parse_action('Action: shell {"cmd": "ls"}', SCHEMAS)["error"]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_parse_action_never_raises_on_any_text(text):
    out = L.parse_action(text, SCHEMAS)
    assert out["kind"] in ("call", "final", "error")


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(SCHEMAS)), st.text(max_size=20), st.text(max_size=20))
def test_a_serialised_call_parses_back_to_its_arguments(tool, thought, value):
    thought = thought.replace("Action:", "").replace("Final Answer:", "")
    arg = next(iter(SCHEMAS[tool]))
    turn = f"Thought: {thought} Action: {tool} {json.dumps({arg: value})}"
    assert L.parse_action(turn, SCHEMAS) == {"kind": "call", "tool": tool, "args": {arg: value}}


# ------------------------------------------------------------------------------------------------
# The calculator


def _expression(depth: int):
    leaf = st.integers(0, 50).map(lambda n: (str(n), n))
    if depth == 0:
        return leaf
    sub = _expression(depth - 1)
    node = st.tuples(sub, st.sampled_from("+-*"), sub).map(
        lambda t: (f"({t[0][0]}{t[1]}{t[2][0]})", {"+": t[0][1] + t[2][1], "-": t[0][1] - t[2][1],
                                                   "*": t[0][1] * t[2][1]}[t[1]]))
    return st.one_of(leaf, node)


@settings(max_examples=150, deadline=None)
@given(_expression(3))
def test_calculator_equals_the_value_built_with_the_expression(case):
    text, value = case
    assert L.calculate(text) == str(value)


def test_calculator_never_calls_eval_exec_or_compile():
    tree = ast.parse(open(L.__file__).read())
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}


def test_calculator_refusals_are_fast():
    start = time.process_time()
    for attack in ["2**2**22", "9**9**9", "10**10**10", "(" * 30 + "9**99" + ")" * 30, "1" * 199]:
        with pytest.raises(L.ToolError):
            L.calculate(attack if attack != "1" * 199 else "1" * 199 + "**9")
    assert time.process_time() - start < 0.5


# ------------------------------------------------------------------------------------------------
# The state machine and the traces


def test_react_step_does_not_modify_its_input_state():
    tools = L.make_tools(L.KnowledgeTable({"plum": 42}))
    state = L.new_state("q")
    turn = 'Action: lookup {"key": "plum"}'
    new = L.react_step(state, turn, L.parse_action(turn, L.schemas_of(tools)), tools, 4)
    assert state == L.new_state("q") and new["steps"][0]["observation"] == "42" and new["stop"] is None


def test_a_tool_that_crashes_becomes_an_observation():
    tools = {"boom": L.Tool("boom", lambda: 1 / 0, {})}
    state = L.react_step(L.new_state("q"), "Action: boom {}", {"kind": "call", "tool": "boom", "args": {}}, tools, 3)
    assert state["steps"][0]["observation"].startswith("error: ZeroDivisionError") and state["stop"] is None


def test_gold_trajectories_answer_correctly_and_tokenize_round_trip():
    g = torch.Generator().manual_seed(3)
    vocab = M.Vocab()
    for _ in range(40):
        table = M.draw_table(12, g)
        problem = M.draw_problems(1, table, g)[0]
        state = M.gold_trajectory(problem, L.make_tools(table), 4)
        assert state["stop"] == "final_answer" and state["answer"] == M.true_answer(problem, table)
        ids, roles = M.encode_trajectory(state, vocab)
        assert vocab.decode(ids) == L.render_trajectory(state) and len(ids) == len(roles) <= 48


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_vocab_round_trips_printable_text(text):
    vocab = M.Vocab()
    assert vocab.decode(vocab.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_agent_sft_labels_keep_exactly_the_model_tokens(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (B, T), generator=g)
    roles = torch.randint(0, 4, (B, T), generator=g)
    labels = M.agent_sft_labels(ids, roles)
    assert torch.equal(labels == -100, roles != M.ROLE_MODEL)
    assert torch.equal(labels[roles == M.ROLE_MODEL], ids[roles == M.ROLE_MODEL])


# ------------------------------------------------------------------------------------------------
# The endpoint policy against a stub chat-completions server on 127.0.0.1


class _Stub(http.server.BaseHTTPRequestHandler):
    mode = "ok"
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "500":
            self.send_error(500, "boom")
            return
        context = body["messages"][-1]["content"]
        if "Observation:" not in context:
            content = 'Thought: look it up. Action: lookup {"key": "plum"}\nObservation: 99 (made up)'
        else:
            content = f"Thought: done. Final Answer: {context.rsplit('Observation: ', 1)[1].strip()}"
        payload = b"not json" if self.mode == "garbage" else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.requests, _Stub.mode = [], "ok"
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_endpoint_runs_the_loop_against_a_chat_completions_server(stub, capsys):
    assert E.main(["run", "--endpoint", stub, "--json", "weight of plum"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["answer"] == str(E.DEMO_TABLE["plum"])  # the made-up observation was cut off
    assert [s["observation"] for s in state["steps"]] == ["42", None]
    path, body = _Stub.requests[0]
    assert path == "/v1/chat/completions" and body["stop"] == ["Observation:"] and body["temperature"] == 0
    assert "lookup" in body["messages"][0]["content"]


@pytest.mark.parametrize("mode, said", [("500", "HTTP 500"), ("garbage", "chat-completions"), ("slow", "within 0.3 s")])
def test_endpoint_errors_are_exit_3_with_the_reason(stub, mode, said, capsys):
    _Stub.mode = mode
    assert E.main(["run", "--endpoint", stub, "--timeout", "0.3", "q"]) == 3
    assert said in capsys.readouterr().err


def test_unreachable_endpoint_is_exit_3(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    assert E.main(["run", "--endpoint", f"http://127.0.0.1:{port}", "--timeout", "2", "q"]) == 3
    assert "cannot reach" in capsys.readouterr().err


def test_endpoint_usage_errors_are_exit_2(capsys):
    assert E.main(["run", "--endpoint", "file:///etc/passwd", "q"]) == 2
    assert E.main(["run", "q"]) == 2
    assert E.chat_url("http://h:1/v1") == "http://h:1/v1/chat/completions"


# ------------------------------------------------------------------------------------------------
# The audit


@pytest.fixture(scope="module")
def toy_result():
    return audit_once("agent", "toy", 0)


def test_audit_passes_toy(toy_result):
    assert toy_result.passed, [(c.name, c.measured) for c in toy_result.checks if not c.passed] or toy_result.error
    assert {c.kind for c in toy_result.checks} == {"invariant", "outcome"}
    assert "train/loss" in toy_result.series


@pytest.mark.slow
def test_audit_passes_full():
    result = audit_once("agent", "full", 1)
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed] or result.error


def test_same_seed_same_result(toy_result):
    assert audit_once("agent", "toy", 0).deterministic_dict() == toy_result.deterministic_dict()


def unstripped_answer(text, schemas):
    out = L.parse_action(text, schemas)
    return {**out, "answer": text.split("Final Answer:", 1)[1]} if out["kind"] == "final" else out


def strict_json_only(text, schemas):
    return {"kind": "error", "error": "spaces"} if '": ' in text else L.parse_action(text, schemas)


def no_repeat_guard(state, turn, action, tools, max_steps):
    hidden = {**state, "steps": [{**s, "action": None} for s in state["steps"]]}
    out = L.react_step(hidden, turn, action, tools, max_steps)
    return {**out, "steps": list(state["steps"]) + out["steps"][-1:]}


def every_token_labelled(input_ids, roles, ignore_index=-100):
    return torch.where(roles != M.ROLE_PAD, input_ids, torch.full_like(input_ids, ignore_index))


def mask_shifted_by_one(input_ids, roles, ignore_index=-100):
    shifted = torch.roll(roles, 1, dims=1)
    return torch.where(shifted == M.ROLE_MODEL, input_ids, torch.full_like(input_ids, ignore_index))


def _counting_calculator():
    calls, original = itertools.count(), L.calculate
    return lambda expr: str(int(original(expr)) + next(calls))


def _eval_calculator(expr):
    return str(eval(expr))  # the mutant: what the calculator must never do


MUTANTS = [
    Mutant("parse_action_reads_hand_worked_turns", "answer not stripped", {"parse_action": unstripped_answer}),
    Mutant("malformed_turns_become_errors", "argument types unchecked",
           patch=patched(L, "_TYPES", {"string": object, "number": object})),
    Mutant("calculator_matches_exact_arithmetic", "subtraction reversed",
           patch=patched(L, "_BINARY", {**L._BINARY, ast.Sub: lambda a, b: b - a})),
    Mutant("calculator_refuses_code_without_running_it", "eval", patch=patched(L, "calculate", _eval_calculator)),
    Mutant("lookup_and_search_read_their_data", "search returns the first card",
           patch=lambda: mock.patch.object(L.CardIndex, "search", lambda self, query: f"{next(iter(self.texts))}: x")),
    Mutant("errors_are_observed_and_loops_are_stopped", "no repeat guard", {"react_step": no_repeat_guard}),
    Mutant("replayed_trajectories_reproduce_their_observations", "a tool with hidden state",
           patch=lambda: patched(L, "calculate", _counting_calculator())()),
    Mutant("observations_are_masked_out_of_the_labels", "loss on every token",
           {"agent_sft_labels": every_token_labelled}),
    Mutant("observation_tokens_get_no_gradient", "mask shifted by one", {"agent_sft_labels": mask_shifted_by_one}),
    Mutant("sft_loss_decreases", "learning rate 0", overrides={"lr": "0"}),
    Mutant("trained_policy_acts_well_formed", "parser rejects standard JSON", {"parse_action": strict_json_only}),
    Mutant("tools_beat_answering_without_tools", "two SFT steps", overrides={"steps": "2"}, mode="full"),
]


@mutant_params([m for m in MUTANTS if m.mode == "toy"])
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("agent", mutant)


@pytest.mark.slow
@mutant_params([m for m in MUTANTS if m.mode == "full"])
def test_full_mode_mutant_breaks_its_check(mutant):
    assert_mutant_fails("agent", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("agent", MUTANTS)
