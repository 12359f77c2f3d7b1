"""calc: sizing arithmetic of an LLM -- parameters, FLOPs, training memory, KV cache, MFU -- for a
preset or an HF config.json. The arithmetic lives in modules/megatron/sizing.py (plain Python, no
torch), reached by name like the numeric quiz items reach module code, so the command and the model's
own counts can never disagree."""
from __future__ import annotations

import importlib
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from llmaudit.cli.common import JsonOpt, UsageError, emit_json, errors, out

app = typer.Typer()


class What(str, Enum):
    params = "params"
    flops = "flops"
    memory = "memory"
    kv = "kv"
    mfu = "mfu"


def _sizing() -> Any:
    return importlib.import_module("modules.megatron.sizing")


def _specs(S: Any, preset: Optional[str], config: Optional[Path]) -> list:
    if preset and config:
        raise UsageError("give --preset or --config, not both")
    if config is not None:
        if not config.is_file():
            raise UsageError(f"{config}: no such file (an HF config.json)")
        try:
            return [S.load_config(config)]
        except (ValueError, json.JSONDecodeError) as exc:
            raise UsageError(f"{config}: {exc}") from None
    if preset:
        if preset not in S.PRESETS:
            import difflib

            near = difflib.get_close_matches(preset, list(S.PRESETS), n=3)
            raise UsageError(f"unknown preset {preset!r}" + (f"; did you mean {', '.join(near)}?" if near else "")
                             + f" Known: {', '.join(S.PRESETS)}")
        return [S.preset(preset)]
    return [S.preset(name) for name in S.PRESETS]


def _row(S: Any, s: Any, what: What, o: dict[str, Any]) -> dict[str, Any]:
    if what is What.params:
        return {"model": s.name, **S.params_breakdown(s)}
    if what is What.flops:
        return {"model": s.name, "seq_len": o["seq_len"], **S.flops_per_token(s, o["seq_len"]),
                "embedding_counted": False}
    if what is What.memory:
        return {"model": s.name, "dp": o["dp"], "tp": o["tp"], "pp": o["pp"], "zero_stage": o["zero"],
                "precision": o["precision"], "optimizer": o["optimizer"],
                **S.training_memory(s, dp=o["dp"], tp=o["tp"], pp=o["pp"], zero_stage=o["zero"],
                                    precision=o["precision"], optimizer=o["optimizer"])}
    if what is What.kv:
        return {"model": s.name, "seq_len": o["seq_len"], "batch": o["batch"], "bytes_per_elem": o["bytes"],
                **S.kv_cache(s, seq_len=o["seq_len"], batch=o["batch"], bytes_per_elem=o["bytes"])}
    if o["tokens_per_s"] is None or o["peak_tflops"] is None:
        raise UsageError("mfu needs --tokens-per-s (measured training throughput) and --peak-tflops (per GPU)")
    return {"model": s.name, "tokens_per_s": o["tokens_per_s"], "peak_tflops": o["peak_tflops"], "gpus": o["gpus"],
            **S.mfu(s, tokens_per_s=o["tokens_per_s"], peak_flops=o["peak_tflops"] * 1e12, n_gpus=o["gpus"],
                    seq_len=o["seq_len"])}


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


@app.command()
def calc(
    what: Annotated[What, typer.Argument(help="params | flops | memory | kv | mfu")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="llama-2-7b, llama-3-8b, mistral-7b, qwen2-7b, "
                                                  "gpt2, minimind-3, ... (all presets when neither is given)")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="An HF config.json.")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="Context length T.")] = 4096,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Sequences (kv).")] = 1,
    nbytes: Annotated[int, typer.Option("--bytes", min=1, help="Bytes per KV element (2 = bf16).")] = 2,
    dp: Annotated[int, typer.Option("--dp", min=1, help="Data-parallel ranks N.")] = 1,
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel size t.")] = 1,
    pp: Annotated[int, typer.Option("--pp", min=1, help="Pipeline stages p.")] = 1,
    zero: Annotated[int, typer.Option("--zero", min=0, max=3, help="ZeRO stage (0 = plain DDP).")] = 0,
    precision: Annotated[str, typer.Option("--precision", help="mixed (bf16 + fp32 master) | fp32")] = "mixed",
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam | sgd (with momentum)")] = "adam",
    tokens_per_s: Annotated[Optional[float], typer.Option("--tokens-per-s", min=0.0,
                                                          help="Measured training tokens/s (mfu).")] = None,
    peak_tflops: Annotated[Optional[float], typer.Option("--peak-tflops", min=0.0,
                                                         help="Peak TFLOP/s per GPU (A100 bf16: 312).")] = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="GPUs that produced the tokens/s (mfu).")] = 1,
    json_mode: JsonOpt = False,
) -> None:
    """Exact sizing of an LLM: parameter count, FLOPs per token (6N + attention; the embedding lookup
    not counted), model-state memory per GPU by precision / optimizer / ZeRO stage / TP / PP / DP, KV
    cache bytes per token (GQA), MFU from a measured throughput.

    Examples: llmaudit calc params --preset llama-2-7b · llmaudit calc memory --preset llama-3-8b --dp 8
    --zero 3 · llmaudit calc kv --config config.json --seq-len 8192 · llmaudit calc mfu --preset llama-2-7b
    --tokens-per-s 3000 --peak-tflops 312
    """
    with errors(json_mode):
        S = _sizing()
        if (precision, optimizer) not in S.PRECISIONS:
            raise UsageError(f"--precision {precision} --optimizer {optimizer}: choose from "
                             + ", ".join(f"{p}/{o}" for p, o in S.PRECISIONS))
        options = {"seq_len": seq_len, "batch": batch, "bytes": nbytes, "dp": dp, "tp": tp, "pp": pp, "zero": zero,
                   "precision": precision, "optimizer": optimizer, "tokens_per_s": tokens_per_s,
                   "peak_tflops": peak_tflops, "gpus": gpus}
        rows = [_row(S, s, what, options) for s in _specs(S, preset, config)]
    if json_mode:
        emit_json("llmaudit.calc/v1", {"what": what.value, "rows": rows})
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    if len(rows) == 1:  # one model: a field per line
        table.add_column("field")
        table.add_column(rows[0]["model"], justify="right")
        for key, value in rows[0].items():
            if key != "model":
                table.add_row(key, _cell(value))
        out().print(table)
        return
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    import sys

    from rich.console import Console

    Console(file=sys.stdout, highlight=False, width=40 + 17 * len(rows[0])).print(table)
