"""Audit of the agent module (day 16): a ReAct loop whose guards hold, and a tiny Llama that learns to use it."""
from __future__ import annotations

import torch

from llmaudit.audit import Audit, kernel, measure
from modules.agent import loop as L
from modules.agent import task as M
from modules.sft import sft_loss
from modules.transformer import Transformer

SCHEMAS = {"calc": {"expr": "string"}, "lookup": {"key": "string"}, "search": {"query": "string"}}


def _parse_example() -> dict:
    return {"text": 'Thought: I need a fact. Action: lookup {"key": "plum"}', "schemas": SCHEMAS}


def _step_example() -> dict:
    tools = L.make_tools(L.KnowledgeTable({"plum": 42}))
    turn = 'Thought: I need to compute. Action: calc {"expr": "42*3+5"}'
    return {"state": L.new_state("weight of plum times 3 plus 5"), "turn": turn,
            "action": L.parse_action(turn, L.schemas_of(tools)), "tools": tools, "max_steps": 4}


def _labels_example() -> dict:
    roles = torch.tensor([[0, 0, 1, 1, 2, 2, 1, 1], [0, 1, 1, 2, 1, 1, 3, 3]])
    return {"input_ids": torch.arange(16).reshape(2, 8) + 1, "roles": roles, "ignore_index": -100}


KERNELS = [
    kernel(L.parse_action, example=_parse_example,
           hint="exactly one 'Action:' or 'Final Answer:'; json.loads the arguments (never eval); the tool "
                "must be in the schemas and the keys and types must match exactly; return an error, never raise."),
    kernel(L.react_step, example=_step_example,
           hint="a parse error or a tool exception becomes the observation 'error: ...' and the episode goes on; "
                "a (tool, args) seen before stops with 'repeated_action' unexecuted; the step limit comes last."),
    kernel(M.agent_sft_labels, example=_labels_example,
           hint="keep the id only where roles == ROLE_MODEL; question, observations and padding get ignore_index; "
                "do not shift (the loss does)."),
]

agent = Audit("agent", day=16, title="Agents: a ReAct loop with safe tools, and a tiny Llama SFT-trained to use it",
              config=M.AgentConfig, kernels=KERNELS, formulas=M.FORMULAS)


@agent.fixture
def table(cfg, g):
    """The knowledge table of the invariants (fruit -> weight)."""
    return M.draw_table(cfg.n_entities, g)


@agent.fixture
def traces(cfg, g):
    """Gold trajectories played through the loop, tokenized with their roles."""
    data = M.build_traces(cfg, g)
    return dict(zip(("vocab", "tools", "states", "ids", "roles"), data), data=data)


@agent.fixture(cost=30)
def trained(ctx, cfg, g, traces, agent_sft_labels, parse_action, react_step):
    """Masked SFT on the gold traces, then the model in the loop (and without tools) on fresh questions."""
    return M.run(cfg, g, agent_sft_labels=agent_sft_labels, parse_action=parse_action, react_step=react_step,
                 data=traces["data"], on_progress=ctx.progress)


# ---- parsing: model text is data, checked against the schemas -----------------------------------------

HAND_WORKED = [
    ('Thought: I need a fact. Action: lookup {"key": "plum"}',
     {"kind": "call", "tool": "lookup", "args": {"key": "plum"}}),
    ('Action: calc {"expr": "2*(3+4)"}\n', {"kind": "call", "tool": "calc", "args": {"expr": "2*(3+4)"}}),
    ("Thought: I have the answer. Final Answer: 131", {"kind": "final", "answer": "131"}),
    ("Final Answer:  plum weighs 42 \n", {"kind": "final", "answer": "plum weighs 42"}),
    ('Thought: x. Action: search {"query": "kv cache"}',
     {"kind": "call", "tool": "search", "args": {"query": "kv cache"}}),
]


@agent.check("== 0", hint="strip the turn; split on the marker; json.loads the rest after the tool name.")
def parse_action_reads_hand_worked_turns(parse_action):
    """A well-formed turn becomes exactly one call (tool + JSON arguments) or one final answer."""
    wrong = [text for text, want in HAND_WORKED if parse_action(text, SCHEMAS) != want]
    return measure(len(wrong), f"wrong: {wrong[:1]}" if wrong else f"{len(HAND_WORKED)} turns")


MALFORMED = [
    "", "Thought: I am thinking.", 'Action: calc {"expr": "1"} Final Answer: 1', 'Action: calc {"expr": "1"} '
    'Action: calc {"expr": "2"}', 'Action: rm {"path": "/"}', 'Action: calc {"expr": 5}', 'Action: calc {"expr": "1",',
    'Action: calc {"expr": "1", "mode": "x"}', 'Action: lookup {}', 'Action: calc ["1+1"]', "Action: calc 1+1",
    'Action: {"expr": "1"}', 'Action: lookup {"key": true}', "Action: calc " + "[" * 5000 + "]" * 5000,
    'Action: __import__ {"expr": "1"}', 'Action: calc {"expr": "1"}}',
]


@agent.check({"not_an_error": "== 0", "fuzz_not_a_dict": "== 0"}, hint="catch JSON errors (ValueError, "
             "RecursionError); check the tool name, the exact key set and each value's type before returning a call.")
def malformed_turns_become_errors(parse_action, cfg, g):
    """Unknown tools, bad JSON, missing, extra or mistyped arguments and two actions in one turn are an
    error the loop reports back to the model, never a crash and never a call."""
    bad = [t for t in MALFORMED if parse_action(t, SCHEMAS).get("kind") != "error"]
    alphabet = 'Action: Final Answer: calc lookup {"expr": "key"} 0123456789+*-[]'
    fuzz = 0
    for _ in range(cfg.n_fuzz):
        chars = torch.randint(0, len(alphabet), (int(torch.randint(0, 60, (1,), generator=g)),), generator=g)
        out = parse_action("".join(alphabet[i] for i in chars.tolist()), SCHEMAS)
        fuzz += not (isinstance(out, dict) and out.get("kind") in ("call", "final", "error"))
    return measure({"not_an_error": len(bad), "fuzz_not_a_dict": fuzz}, f"accepted: {bad[:1]}" if bad else "")


# ---- the tools: exact where they answer, refusing where they must --------------------------------------

def _random_expression(g: torch.Generator, depth: int) -> tuple[str, int]:
    """A random integer expression over + - * with parentheses and signs, and its value built alongside."""
    if depth == 0 or torch.rand(1, generator=g).item() < 0.3:
        n = int(torch.randint(0, 30, (1,), generator=g))
        return str(n), n
    (a, x), (b, y) = _random_expression(g, depth - 1), _random_expression(g, depth - 1)
    op = "+-*"[int(torch.randint(0, 3, (1,), generator=g))]
    value = {"+": x + y, "-": x - y, "*": x * y}[op]
    return (f"-({a}{op}{b})", -value) if torch.rand(1, generator=g).item() < 0.2 else (f"({a}{op}{b})", value)


CALC_CASES = [("7/2", "3.5"), ("2**10", "1024"), ("-3**2", "-9"), ("17//5", "3"), ("17%5", "2"), (" 1.5*4 ", "6")]


@agent.check("== 0", hint="evaluate the whitelisted tree yourself (operator.add, ...): no eval, no compile.")
def calculator_matches_exact_arithmetic(g):
    """The calculator's answer equals the value computed alongside each random expression tree (Python's
    precedence: -3**2 is -9), so refusing code costs no correctness."""
    cases = CALC_CASES + [(e, str(v)) for e, v in (_random_expression(g, 3) for _ in range(40))]
    wrong = [(e, want) for e, want in cases if L.calculate(e) != want]
    return measure(len(wrong), f"e.g. {wrong[0]}" if wrong else f"{len(cases)} expressions")


CANARY = "__import__('modules.agent.loop', fromlist=['EXECUTED']).EXECUTED"
ATTACKS = [
    f"{CANARY}.append(1)", f"(lambda: {CANARY}.append(2))()", f"[{CANARY}.append(3)][0]", f"1+{CANARY}.append(4)",
    "().__class__.__base__.__subclasses__()", "open('/dev/null').read()", "__builtins__", "x", "True+1", "~1",
    "1 if 1 else 2", "[1, 2][0]", "{1: 2}", "f'{1}'", "1 < 2", "not 1", "1 and 2", "1;2", "'a'*3", "b'a'",
    "2**2**22", "10**100000", "1e308*10", "9**99", "0**-1", "(-8)**0.5", "(" * 60 + "1" + ")" * 60,
    "(" * 100 + "1" + ")" * 100, "-" * 150 + "1", "1+" * 1000 + "1",
]


@agent.check({"accepted": "== 0", "executed": "== 0"}, hint="walk the AST and allow only Expression, BinOp, "
             "UnaryOp, numeric Constant and the operator nodes; bound length, nesting, exponent and result size.")
def calculator_refuses_code_without_running_it():
    """Names, calls, attributes, subscripts, strings, comparisons, huge exponents and deep nesting are
    refused before anything is evaluated: a canary list the attacks would append to stays empty."""
    L.EXECUTED.clear()
    accepted = []
    for attack in ATTACKS:
        try:
            L.calculate(attack)
            accepted.append(attack)
        except L.ToolError:
            pass
        except Exception:  # a crash is not a refusal
            accepted.append(attack)
    executed = len(L.EXECUTED)
    L.EXECUTED.clear()
    return measure({"accepted": len(accepted), "executed": executed},
                   f"accepted {accepted[0][:40]!r}" if accepted else f"{len(ATTACKS)} attacks")




@agent.check("== 0", hint="lookup reads the table and raises ToolError on an unknown key; search scores cards by "
                          "the query words they contain (rarer words weigh more).")
def lookup_and_search_read_their_data(table):
    """The lookup answers every key from the generated table and refuses unknown ones; search over the
    project's own cards returns each card for its own text (every query word is in it) and the agent
    card for 'ReAct tool use'."""
    texts = L.load_card_texts()
    tools = L.make_tools(table, L.CardIndex(texts))
    wrong = [k for k, v in table.facts.items() if tools["lookup"].fn(key=k) != str(v)]
    for key in ("banana", "", "plum; drop table"):
        try:
            tools["lookup"].fn(key=key)
            wrong.append(key)
        except L.ToolError:
            pass
    queries = {**{text: module for module, text in texts.items()}, "ReAct tool use": "agent"}
    wrong += [q[:30] for q, module in queries.items() if not tools["search"].fn(query=q).startswith(f"{module}:")]
    return measure(len(wrong), f"wrong: {wrong[:2]}" if wrong else "")


# ---- the state machine: errors are observed, loops are stopped ---------------------------------------

def _script(turns: list[str]):
    """A policy that replays fixed turns (then keeps repeating the last one)."""
    it = iter(turns)
    last = [turns[-1]]
    return lambda context: next(it, last[0])


def _episodes(table: L.KnowledgeTable) -> list[tuple[str, list[str], dict]]:
    """(name, scripted turns, what the final state must show)."""
    key = next(iter(table.facts))
    look = f'Action: lookup {{"key": "{key}"}}'
    fin = "Final Answer: 7"
    return [
        ("unknown tool", ['Action: shell {"cmd": "ls"}', fin], {"stop": "final_answer", "errors": 1, "steps": 2}),
        ("bad json", ['Action: calc {"expr": 1+1}', 'Action: calc {"expr": "1+1"}', fin],
         {"stop": "final_answer", "errors": 1, "steps": 3}),
        ("tool error", ['Action: calc {"expr": "1/0"}', fin], {"stop": "final_answer", "errors": 1, "steps": 2}),
        ("attack", [f'Action: calc {{"expr": "{CANARY}.append(9)"}}', fin],
         {"stop": "final_answer", "errors": 1, "steps": 2}),
        ("unknown key", ['Action: lookup {"key": "banana"}', look, fin],
         {"stop": "final_answer", "errors": 1, "steps": 3}),
        ("repeat", [look, look], {"stop": "repeated_action", "errors": 0, "steps": 2}),
        ("never done", [f'Action: calc {{"expr": "1+{i}"}}' for i in range(20)], {"stop": "step_limit", "errors": 0}),
        ("babble", ["I think so."], {"stop": "step_limit"}),
    ]


@agent.check({"not_recovered": "== 0", "not_stopped": "== 0"}, hint="wrap the tool call in try/except and return "
             "the message as the observation; compare the new (tool, args) with every earlier step's.")
def errors_are_observed_and_loops_are_stopped(parse_action, react_step, table, cfg):
    """A wrong tool, bad JSON, a tool error or a refused attack comes back as 'error: ...' and the model
    can still finish; a repeated action or a run past the step limit is stopped with that reason."""
    tools, failed = L.make_tools(table), {"not_recovered": [], "not_stopped": []}
    for name, turns, want in _episodes(table):
        state = L.run_episode("q", _script(turns), tools, cfg.max_steps, parse=parse_action, step=react_step)
        steps = state["steps"]
        errors = sum(str(s["observation"]).startswith("error:") for s in steps)
        part = "not_stopped" if want["stop"] != "final_answer" else "not_recovered"
        ok = (state["stop"] == want["stop"] and errors == want.get("errors", errors)
              and len(steps) == want.get("steps", cfg.max_steps)
              and (want["stop"] != "final_answer" or state["answer"] == "7"))
        if not ok:
            failed[part].append(name)
    detail = "; ".join(f"{k}: {v}" for k, v in failed.items() if v)
    return measure({k: len(v) for k, v in failed.items()}, detail or f"{len(_episodes(table))} scripted episodes")


@agent.check("== 0", hint="tools must be pure functions of their arguments (no hidden counters, clocks or "
                          "randomness), and react_step must not carry anything but the trajectory.")
def replayed_trajectories_reproduce_their_observations(parse_action, react_step, traces, trained, cfg):
    """Feeding a trajectory's own model turns back through the loop reproduces every observation exactly,
    for the gold traces and for the trained model's own episodes: the loop is a deterministic
    function of the model's text, which is what makes traces replayable and debuggable."""
    gold = list(zip(traces["states"], traces["tools"]))[:64]
    mismatches = sum(M.replay([s], tools, cfg.max_steps, parse=parse_action, step=react_step)[0]
                     != L.observations_of(s) for s, tools in gold)
    tools = L.make_tools(trained.eval_table)
    mismatches += sum(M.replay([s], tools, cfg.max_steps, parse=parse_action, step=react_step)[0]
                      != L.observations_of(s) for s in trained.states)
    return measure(mismatches, f"{len(gold)} gold + {len(trained.states)} model trajectories")


# ---- the loss mask: the model learns its own turns, never the observations ----------------------------

@agent.check({"supervised_text_not_the_turns": "== 0", "labelled_non_model_tokens": "== 0"},
             hint="labels = where(roles == ROLE_MODEL, input_ids, ignore_index), aligned with input_ids.")
def observations_are_masked_out_of_the_labels(agent_sft_labels, traces):
    """The supervised tokens of each trajectory decode to exactly the model's turns (Thought/Action and
    Final Answer lines); question, observation and padding tokens carry -100."""
    ids, roles, vocab = traces["ids"], traces["roles"], traces["vocab"]
    labels = agent_sft_labels(ids, roles)
    wrong_text = 0
    for row, state in zip(labels.tolist(), traces["states"]):
        kept = vocab.decode([t for t in row if t != -100])
        wrong_text += kept != "".join(t.strip() + "\n" for t in L.model_turns_of(state))
    leaked = int(((labels != -100) & (roles != M.ROLE_MODEL)).sum())
    n_obs = int((roles == M.ROLE_TOOL).sum())
    return measure({"supervised_text_not_the_turns": wrong_text, "labelled_non_model_tokens": leaked},
                   f"{n_obs} observation tokens in {len(traces['states'])} trajectories")


@agent.check({"observation_targets": "== 0", "model_targets_without_gradient": "== 0"},
             hint="a mask shifted by one position, or observations left in the labels, sends gradient into "
                  "predicting the tool's output.")
def observation_tokens_get_no_gradient(agent_sft_labels, traces, cfg):
    """With modules.sft's masked loss, the logits that predict an observation token get exactly zero
    gradient (the model is never trained to fabricate a tool result), and every logit that predicts a
    model token gets some."""
    ids, roles = traces["ids"][:16], traces["roles"][:16]
    model = Transformer(M.model_config(cfg, len(traces["vocab"])))
    with torch.no_grad():
        logits = model(ids)
    leaf = logits.double().requires_grad_(True)
    loss = sft_loss(leaf, agent_sft_labels(ids, roles))
    grad = torch.autograd.grad(loss, leaf, allow_unused=True)[0] if loss.requires_grad else None
    per_position = grad.abs().amax(-1)[:, :-1] if grad is not None else torch.zeros(ids.shape[0], ids.shape[1] - 1)
    target = roles[:, 1:]  # position t predicts token t + 1
    return {"observation_targets": per_position[target == M.ROLE_TOOL],
            "model_targets_without_gradient": int((per_position[target == M.ROLE_MODEL] == 0).sum())}


# ---- the closed loop: SFT on traces, then the loop on a table the model has never seen ----------------

@agent.check("<= max_loss_ratio", kind="outcome", hint="a loss that stays flat usually means the labels are all "
                                                        "-100 (nothing supervised) or misaligned with the logits.")
def sft_loss_decreases(trained):
    """SFT is maximum likelihood on the model's own turns: the masked loss falls (mean of the last 10 % of
    steps over the first 10 %)."""
    losses = [h["loss"] for h in trained.history]
    return measure(trained.loss_ratio, f"{losses[0]:.3f} -> {losses[-1]:.3f}")


@agent.check({"with_tools": ">= min_tool_accuracy", "gain": ">= min_tool_gain"}, kind="outcome", modes=("full",),
             hint="the model must copy the question's numbers into the calc arguments and the last observation "
                  "into its answer; a loop that drops observations from the context leaves it guessing.")
def tools_beat_answering_without_tools(trained):
    """On a knowledge table redrawn after training, the same model answers far better through the loop
    (lookup, calc, then copy the observation) than when made to answer right after the question."""
    return measure({"with_tools": trained.tool_accuracy, "gain": trained.tool_accuracy - trained.direct_accuracy},
                   f"without tools {trained.direct_accuracy:.3f}")


@agent.check({"well_formed": ">= min_well_formed", "guard_rate": "<= max_guard_rate"}, kind="outcome",
             hint="turns cut before their newline (max_turn_tokens too small) or a format that differs between "
                  "training and the loop make every action malformed and every episode hit the step limit.")
def trained_policy_acts_well_formed(trained):
    """After SFT the model's turns parse into valid actions and episodes end with a Final Answer rather
    than a guard; before SFT the same loop stops every episode by its guards."""
    states = trained.states
    return measure({"well_formed": trained.well_formed(states), "guard_rate": trained.guard_rate(states)},
                   f"before SFT: well-formed {trained.well_formed(trained.base_states):.3f}, "
                   f"guard {trained.guard_rate(trained.base_states):.3f}")


@agent.report
def curves(ctx, trained):
    ctx.series("train/loss", [h["loss"] for h in trained.history], range(1, len(trained.history) + 1),
               x_label="SFT step", label="SFT loss (model turns only)", y_label="loss per supervised token (nats)",
               key=True)
    ctx.scalar("vocab_size", len(trained.vocab))
    ctx.scalar("supervised share of trace tokens", trained.supervised_fraction)
    ctx.scalar("accuracy with tools", trained.tool_accuracy)
    ctx.scalar("accuracy without tools (direct answer)", trained.direct_accuracy)
    ctx.scalar("well-formed turns after SFT", trained.well_formed(trained.states))
    ctx.scalar("guard rate after SFT", trained.guard_rate(trained.states))
    ctx.scalar("guard rate before SFT", trained.guard_rate(trained.base_states))
    stops = [s["stop"] for s in trained.states]
    ctx.table("how episodes ended (after SFT)", ["stop reason", "episodes"],
              [[r, stops.count(r)] for r in L.STOP_REASONS])
    example = next((s for s in trained.states if s["steps"] and len(s["steps"]) == 3), trained.states[0])
    ctx.table("one trajectory of the trained model", ["line"],
              [[line] for line in L.render_trajectory(example).splitlines()])
