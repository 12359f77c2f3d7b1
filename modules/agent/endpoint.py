"""A real model as the policy: the same ReAct loop, each turn asked of an OpenAI-compatible server.

    python -m modules.agent run --endpoint http://127.0.0.1:8080 "weight of plum times 3 plus 25"

POST {endpoint}/v1/chat/completions with the tools' schemas in the system message and the trajectory
so far as the user message; the reply is cut at "Observation:" (the stop sequence) and parsed by
parse_action like the tiny model's turns. Standard library only (urllib); nothing but the given URL
is contacted. Exit codes: 0 a final answer, 1 the loop's guard stopped it, 2 usage error,
3 the server is unreachable, timed out or did not answer like a chat-completions server.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import urllib.error
import urllib.request
from typing import Callable

from modules.agent.loop import (CardIndex, KnowledgeTable, Tool, load_card_texts, make_tools, render_trajectory,
                                run_episode)

__all__ = ["EndpointError", "chat_url", "system_prompt", "chat_policy", "main"]


class EndpointError(Exception):
    """The server could not be reached or did not answer like a chat-completions server (exit 3)."""


def chat_url(endpoint: str) -> str:
    """http://host:port, .../v1 or the full .../v1/chat/completions -> the full URL."""
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--endpoint must be an http:// or https:// URL, got {endpoint!r}")
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def system_prompt(tools: dict[str, Tool]) -> str:
    lines = ["Answer the question with the ReAct format. Write ONE turn, then stop:",
             "Thought: <your reasoning> Action: <tool> <JSON object of arguments>",
             "or, when you know the answer:",
             "Thought: <your reasoning> Final Answer: <the answer>",
             "The runtime runs the tool and appends 'Observation: <result>'. Tools:"]
    lines += [f"- {t.name} {json.dumps({k: v for k, v in t.schema.items()})}: {t.description}" for t in tools.values()]
    return "\n".join(lines)


def chat_policy(endpoint: str, tools: dict[str, Tool], *, model: str = "default", timeout: float = 30.0,
                max_tokens: int = 256) -> Callable[[str], str]:
    """context text -> the server's next turn (greedy, cut at the first 'Observation:')."""
    url, system = chat_url(endpoint), system_prompt(tools)

    def policy(context: str) -> str:
        body = {"model": model, "temperature": 0, "max_tokens": max_tokens, "stop": ["Observation:"],
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": context}]}
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise EndpointError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
        except (socket.timeout, TimeoutError):
            raise EndpointError(f"{url} did not answer within {timeout:g} s (--timeout)") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EndpointError(f"cannot reach {url}: {reason}. Is the server running?") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"{url} did not answer like an OpenAI chat-completions server: "
                                f"{raw[:120]!r}") from None
        if not isinstance(content, str):
            raise EndpointError(f"{url} returned no text content")
        return content.split("Observation:")[0].strip()

    return policy


DEMO_TABLE = {"apple": 31, "pear": 58, "plum": 42, "fig": 17, "lime": 66, "kiwi": 23}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modules.agent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one question with the ReAct loop and a chat-completions server")
    run.add_argument("question")
    run.add_argument("--endpoint", required=True, help="http://host:port of an OpenAI-compatible server")
    run.add_argument("--model", default="default", help="the model name sent to the server")
    run.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply")
    run.add_argument("--max-steps", type=int, default=6, help="the loop's step limit")
    run.add_argument("--json", action="store_true", help="print the final state as one JSON document")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    if args.timeout <= 0 or args.max_steps < 1:
        print("error: --timeout must be > 0 and --max-steps >= 1", file=sys.stderr)
        return 2
    tools = make_tools(KnowledgeTable(DEMO_TABLE), CardIndex(load_card_texts()))
    try:
        policy = chat_policy(args.endpoint, tools, model=args.model, timeout=args.timeout)
        state = run_episode(args.question, policy, tools, args.max_steps)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EndpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(state))
    else:
        print(render_trajectory(state), end="")
        print(f"[stopped: {state['stop']}]" if state["answer"] is None else f"answer: {state['answer']}")
    return 0 if state["stop"] == "final_answer" else 1
