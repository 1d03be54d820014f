"""The Continuum product's reading rules, written from its public source (CambrianTech/continuum:
inference/candle_adapter.rs for the registry, ids and the ChatML builder; model_registry/artifacts.rs
for file picking) as ../shared/reference/continuum-product.md records them -- the judge of what we
ship, so nothing here imports the forge's own registry code.

- the registry file (serde into `ModelRegistry { models: HashMap<String, ModelRegistryEntry> }`:
  `repo: String`, `format/architecture/description/chat_template: Option<String>`,
  `min_memory_gb: Option<f64>`; unknown keys ignored; a parse error leaves the registry empty) and
  its `chat_templates` objects `{system, user, assistant, eos}`;
- model ids: one holding `/` is a Hub repo as it stands, never looked up among the aliases;
- the prompt: `qwen2` / `chatml` get the ChatML builder (a default system turn when the messages
  have none, every turn `<|im_start|>{role}\\n{text}<|im_end|>\\n`, then `<|im_start|>assistant\\n`),
  every other name another family's;
- file picking in a downloaded folder: the model is the newest-mtime `*.gguf` whose lower-cased name
  neither contains `mmproj` nor starts with `mtp-` (ties by name), the projector a `*mmproj*.gguf`,
  the draft head an `mtp-*.gguf`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

DEFAULT_SYSTEM = "You are a helpful AI assistant."
CHATML_NAMES = ("qwen2", "chatml")


class RegistryParseError(ValueError):
    """Where serde would fail: the product logs it and runs with an empty registry."""


def _opt(entry: dict, key: str, kinds: tuple) -> None:
    if key in entry and entry[key] is not None and (not isinstance(entry[key], kinds) or isinstance(entry[key], bool)):
        raise RegistryParseError(f"{key}: {type(entry[key]).__name__} where the product reads {kinds[0].__name__}")


def parse_registry(text: str) -> dict:
    """The registry as the product's types hold it: {"models": {alias: entry}, "chat_templates": ...}."""
    data = json.loads(text)
    models = data.get("models")
    if not isinstance(models, dict):
        raise RegistryParseError("models: not a map")
    out = {}
    for alias, entry in models.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("repo"), str):
            raise RegistryParseError(f"{alias}: repo missing or not a string")
        for key in ("format", "architecture", "description", "chat_template"):
            _opt(entry, key, (str,))
        _opt(entry, "min_memory_gb", (int, float))
        out[alias] = {k: entry.get(k) for k in ("repo", "format", "architecture", "description", "chat_template",
                                                 "min_memory_gb")}
    templates = {}
    for name, t in data.get("chat_templates", {}).items():
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("system", "user", "assistant", "eos")):
            raise RegistryParseError(f"chat_templates.{name}: not a {{system, user, assistant, eos}} object")
        templates[name] = t
    return {"models": out, "chat_templates": templates}


def resolve(model_id: str, registry: dict) -> tuple[str, dict | None]:
    """("alias", entry) when the id is looked up and found, ("hub", None) when it is taken as a repo."""
    if "/" in model_id:
        return "hub", None
    key = model_id.strip().lower()
    for candidate in (key, key.replace("-", ":", 1)):
        if candidate in registry["models"]:  # the map's keys as written
            return "alias", registry["models"][candidate]
    return "hub", None


def builder(template_name: str | None) -> str:
    return "chatml" if (template_name or "").strip().lower() in CHATML_NAMES else "llama3"


def chatml_prompt(messages: list[dict], template: dict) -> str:
    """The product's ChatML prompt from a `chat_templates` object's turn strings."""
    turns = []
    if not any(m["role"] == "system" for m in messages):
        turns.append(template["system"].replace("{system}", DEFAULT_SYSTEM))
    for m in messages:
        role = m["role"] if m["role"] in ("system", "user", "assistant") else "user"
        if role == "system":
            turns.append(template["system"].replace("{system}", m["content"]))
        else:
            turns.append(template["user"].replace("<|im_start|>user", f"<|im_start|>{role}", 1).replace("{content}", m["content"]))
    return "".join(turns) + template["assistant"]


def pick_files(folder: Path) -> dict:
    """{"model", "projector", "draft"}: the files the product takes from a downloaded folder."""
    ggufs = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".gguf"]
    models = [p for p in ggufs if "mmproj" not in p.name.lower() and not p.name.lower().startswith("mtp-")]
    model = max(models, key=lambda p: (p.stat().st_mtime_ns, [-ord(c) for c in p.name]), default=None)
    projectors = sorted(p.name for p in ggufs if "mmproj" in p.name.lower())
    drafts = sorted(p.name for p in ggufs if p.name.lower().startswith("mtp-"))
    return {"model": model.name if model else None, "projectors": projectors, "drafts": drafts}


def arrive(folder: Path, order) -> Path:
    """Files named `order` in a fresh folder, each newer than the last, as a download in that order
    leaves them. The picker reads names and mtimes alone, so they stand empty."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, name in enumerate(order):
        (folder / name).touch()
        os.utime(folder / name, ns=(1_700_000_000_000_000_000 + i * 10**9,) * 2)
    return folder
