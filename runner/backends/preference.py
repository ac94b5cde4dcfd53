"""Preference tuning with axolotl: DPO (`rl: dpo`) and reward models (`reward_model: true`) on comparisons.

A text fine-tune's `params.method` picks how it trains: `sft` (runner.backends.mistral_finetune's
chats), `dpo` or `reward_model`. The last two read comparisons, one JSON line each:
`{"messages": [... ending with the user's turn], "chosen": "...", "rejected": "..."}` (the API
normalises what users upload to this), and change the SFT config as little as they need to: the
dataset type, the trainer, and for a reward model a sequence-classification head (one label) whose
weights peft saves inside the adapter beside the LoRA. Progress, cancel and upload are SFT's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.backends import jsonl
from runner.errors import BadTaskInput

SFT, DPO, REWARD_MODEL = "sft", "dpo", "reward_model"
METHODS = (SFT, DPO, REWARD_MODEL)
ROLES = ("system", "user", "assistant")
DEFAULT_BETA = 0.1  # TRL's own default for DPO's KL weight


def method_of(params: dict[str, Any]) -> str:
    """The task's training method; BadTaskInput for one this runner does not know."""
    method = params.get("method") or SFT
    if method not in METHODS:
        raise BadTaskInput(f"params.method: {method!r} is not one of {', '.join(METHODS)}")
    return method


def _comparison_of(row: Any) -> dict[str, Any]:
    """One comparison line as axolotl reads it; ValueError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    messages = row.get("messages")
    if messages is None and isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
    if not isinstance(messages, list) or not messages:
        raise ValueError('no "messages" list (or "prompt")')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} is not a system, user or assistant message with text")
    if messages[-1]["role"] != "user":
        raise ValueError("the messages must end with the user's turn")
    out: dict[str, Any] = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    for name in ("chosen", "rejected"):
        value = row.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'no "{name}" reply')
        out[name] = value
    return out


def load_comparisons(files: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    """Every line of the JSONL files as a comparison; BadTaskInput naming the bad lines."""
    return jsonl.read(files, _comparison_of, error=BadTaskInput, what="comparisons")


def training_rows(method: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines axolotl reads for `method`: as they are, but for a reward model in the Bradley-Terry shape.

    axolotl's `bradley_terry.chat_template` takes one turn, `{"system", "input", "chosen", "rejected"}`:
    the system messages are joined, and earlier turns go into the input as a transcript before the last
    user message (scoring asks about one prompt, so they are rare).
    """
    if method != REWARD_MODEL:
        return rows
    out = []
    for row in rows:
        *earlier, last = row["messages"]
        system = "\n\n".join(m["content"] for m in earlier if m["role"] == "system")
        history = "".join(f"{m['role']}: {m['content']}\n\n" for m in earlier if m["role"] != "system")
        out.append({"system": system, "input": history + last["content"], "chosen": row["chosen"],
                    "rejected": row["rejected"]})
    return out


def preference_config(cfg: dict[str, Any], method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The SFT axolotl config `cfg` turned into a DPO or reward-model one (the same for `sft`)."""
    if method == SFT:
        return cfg
    [dataset] = cfg["datasets"]
    out = dict(cfg)
    fields = {"path": dataset["path"], "ds_type": "json", "field_messages": "messages"}
    if method == DPO:
        beta = params.get("beta")
        out.update({"rl": "dpo", "rl_beta": float(beta) if beta is not None else DEFAULT_BETA,
                    "datasets": [{**fields, "type": "chat_template.default", "field_chosen": "chosen",
                                  "field_rejected": "rejected"}]})
        sft_weight = float(params.get("sft_weight") or 0)
        if sft_weight > 0:
            # DPO plus the chosen replies' own likelihood (RPO): on a few pairs, plain DPO can drive both
            # replies' likelihood down and the model off its rails; the SFT term keeps the chosen ones likely.
            out.update({"dpo_loss_type": ["sigmoid", "sft"], "dpo_loss_weights": [1.0, sft_weight]})
    else:
        # A one-label score head on the base model: LoRA in the body, the head saved in full beside it.
        # axolotl pads every pair to sequence_len unless told not to: wasted work on a CPU.
        out.update({"reward_model": True, "num_labels": 1, "pad_to_sequence_len": False,
                    "datasets": [{**fields, "type": "bradley_terry.chat_template"}]})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as JSON lines."""
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
