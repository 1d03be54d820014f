"""Composing conf/ with Hydra: the alloy's own tier and quant first, then the command line's
overrides; then the result is checked against the schema in conf_schema.py (types and ranges).
Errors from either are turned into refusals that name the override (or conf file), the value and
what is allowed.
"""
from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path

from .errors import ForgeError
from .paths import conf_dir

GROUPS = ("tier", "quant", "backend", "sensory")
# Command-line variables that select alloys rather than override configuration.
SELECTORS = ("alloy",)


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@lru_cache(maxsize=None)
def aliases() -> dict:
    import yaml  # plain YAML, no interpolation: OmegaConf (and Hydra) load only when composing

    return yaml.safe_load((conf_dir() / "aliases.yaml").read_text())


def resolve_quant(name: str, where: str) -> str:
    """A conf/quant name from a conf name, an alias (`iq3`) or a llama.cpp type (`IQ3_M`)."""
    key = name.strip().lower()
    key = aliases()["quant"].get(key, key)
    if key not in choices("quant"):
        raise ForgeError(
            f"unknown quant {name!r}", where=where, found=name,
            allowed=choices("quant") + [f"{a} (= {t})" for a, t in aliases()["quant"].items()],
        )
    return key


def parse_overrides(pairs: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split doit's command-line variables into selectors and canonical Hydra overrides.

    Returns (selectors, overrides); overrides are `key=value` strings with quant aliases resolved
    and group names checked, sorted so that the same request always keys the same variant."""
    selectors, overrides = {}, []
    for key, value in pairs.items():
        if key in SELECTORS:
            selectors[key] = value
            continue
        bare = key.lstrip("+~")
        if bare == "quant":
            value = resolve_quant(value, where=f"override quant={value}")
        elif bare in GROUPS and value not in choices(bare):
            raise ForgeError(
                f"unknown {bare} {value!r}", where=f"override {key}={value}", found=value, allowed=choices(bare)
            )
        if not re.fullmatch(r"[+~]{0,2}[A-Za-z_][A-Za-z0-9_.]*", key):
            raise ForgeError("not a configuration key", where=f"override {key}={value}", found=key,
                             allowed="a group (tier, quant, backend, sensory) or a dotted key such as tier.n_seq_max")
        overrides.append(f"{key}={value}")
    return selectors, sorted(overrides)


def _hydra_compose(overrides: tuple[str, ...]) -> tuple[dict, dict]:
    """conf/ composed with these overrides, as plain data, and the file Hydra chose per group."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    from hydra.core.global_hydra import GlobalHydra

    # Initialise Hydra once per process (the costly part) and keep it for every composition.
    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3")
    where = "overrides " + " ".join(overrides)
    try:
        # Hydra's own node comes along only to say which file each group came from.
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        cause = e.__cause__
        if cause is not None and str(cause):
            msg = f"{msg} ({str(cause).splitlines()[0]})"
        raise ForgeError(f"configuration does not compose: {msg}", where=where,
                         allowed=f"groups {', '.join(GROUPS)}; keys present in conf/") from None
    chosen = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        return OmegaConf.to_container(cfg, resolve=True), chosen
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        raise ForgeError(f"configuration does not resolve: {str(e).splitlines()[0]}", where=where) from None


def value_origin(key: str, overrides: tuple[str, ...], chosen: dict) -> str:
    """Where a composed key's value came from: the override that set it (or a part of it), else the
    conf file of its group, else conf/config.yaml."""
    for o in overrides:
        name = o.split("=", 1)[0].lstrip("+~")
        if name not in GROUPS and (key == name or key.startswith((name + ".", name + "["))):
            return f"override {o}"
    group = key.split(".", 1)[0].split("[", 1)[0]
    if chosen.get(group):
        return str(conf_dir() / group / f"{chosen[group]}.yaml")
    return str(conf_dir() / "config.yaml")


@lru_cache(maxsize=None)
def _compose_cached(overrides: tuple[str, ...]) -> dict:
    """Composed and checked against compiler/conf_schema.py, once per distinct override set: a
    value of the wrong type or outside its range is refused here, before anything is planned.

    Across runs too: a composition that passed is kept in the build's state folder under a digest
    of everything it depends on (every file under conf/, this module, the schema module, the alloy
    schema the quant types come from, and the overrides), so a no-op run never starts Hydra. A
    refusal is never kept: it is composed again, and refused again, each run."""
    from .store import stat_cache

    key = _composition_key(overrides, stat_cache())
    kept = _kept_compositions()
    if key in kept:
        return kept[key]
    from . import conf_schema

    data, chosen = _hydra_compose(overrides)
    checked = conf_schema.validate(data, where=lambda k: value_origin(k, overrides, chosen))
    _keep_composition(key, checked)
    return checked


def _composition_key(overrides: tuple[str, ...], cache) -> str:
    import hashlib

    from .paths import SCHEMA_DIR

    h = hashlib.sha256(json.dumps(list(overrides)).encode())
    here = Path(__file__).resolve().parent
    files = sorted(conf_dir().rglob("*.yaml")) + [here / "config.py", here / "conf_schema.py",
                                                  SCHEMA_DIR / "alloy.schema.json"]
    for f in files:
        h.update(str(f).encode() + b"\0" + cache.sha256(f).encode())
    return h.hexdigest()


def _compositions_path() -> Path:
    from .paths import state_dir

    return state_dir() / "compositions.json"


@lru_cache(maxsize=1)
def _kept_compositions() -> dict:
    try:
        return json.loads(_compositions_path().read_text())
    except (OSError, ValueError):
        return {}


def _keep_composition(key: str, checked: dict) -> None:
    from .paths import keep_state

    kept = _kept_compositions()
    kept[key] = checked
    for old in list(kept)[:-256]:  # edits of conf/ leave old keys behind: keep the latest few hundred
        del kept[old]
    keep_state(_compositions_path().name, kept)


def compose(tier: str, quant: str, overrides: list[str]) -> dict:
    """The resolved configuration for one variant, as plain data.

    The alloy's tier and quant come first and the command line's overrides after (Hydra: later
    wins). A tier names its default backend; unless `backend=` is given, a second composition puts
    it in place (compositions are cached, so this costs once per tier)."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    base = [b for b in (f"tier={tier}", f"quant={quant}") if b.split("=", 1)[0] not in given]
    # A copy each time: callers may change what they get, the cache must not see it.
    cfg = copy.deepcopy(_compose_cached(tuple(base + list(overrides))))
    if "backend" not in given and cfg["backend"]["name"] != cfg["tier"]["backend_default"]:
        base.append(f"backend={cfg['tier']['backend_default']}")
        cfg = copy.deepcopy(_compose_cached(tuple(base + list(overrides))))
    return cfg
