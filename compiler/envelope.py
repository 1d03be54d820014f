"""The memory envelope: what a variant needs at its tier's settings, term by term, and whether it
fits beside the sensory stack under the tier's rules. Pure: it takes GGUF layouts (header and tensor
table, no weights) and the composed configuration.

Qwen3.5 is hybrid: only every `full_attention_interval`-th layer has a KV cache (scaling with
context); the others are Gated DeltaNet layers with a fixed F32 recurrent state per sequence
(FACTS.md, "Memory of a Qwen3.5 model in llama.cpp"). The formulas follow llama.cpp's own
(llama_hparams::n_embd_r / n_embd_s, the KV cache's per-layer K and V rows).
"""
from __future__ import annotations

GiB = 2**30
MiB = 2**20
BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}
KV_PAD = 256  # llama.cpp pads the KV cache size to a multiple of this


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def text_shape(layout: dict) -> dict:
    meta = layout["meta"]
    arch = meta["general.architecture"]

    def p(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_layer = int(p("block_count"))
    interval = int(p("full_attention_interval", 1) or 1)
    n_attn = sum(1 for i in range(n_layer) if (i + 1) % interval == 0)
    tensors = {t["name"]: t for t in layout["tensors"]}
    emb = tensors["token_embd.weight"]
    return {
        "arch": arch, "n_layer": n_layer, "n_attn_layers": n_attn, "n_recurrent_layers": n_layer - n_attn,
        "n_embd": int(p("embedding_length")), "n_ff": int(p("feed_forward_length")),
        "n_head_kv": int(p("attention.head_count_kv")), "key_length": int(p("attention.key_length")),
        "value_length": int(p("attention.value_length")),
        "ssm_d_conv": int(p("ssm.conv_kernel", 0) or 0), "ssm_d_inner": int(p("ssm.inner_size", 0) or 0),
        "ssm_d_state": int(p("ssm.state_size", 0) or 0), "ssm_n_group": int(p("ssm.group_count", 0) or 0),
        "n_vocab": int(emb["dims"][1]), "tied_output": "output.weight" not in tensors,
        "token_embd_bytes": int(emb["n_bytes"]),
        "weights_bytes": sum(int(t["n_bytes"]) for t in layout["tensors"]),
    }


def vision_shape(layout: dict) -> dict:
    meta = layout["meta"]
    return {
        "weights_bytes": sum(int(t["n_bytes"]) for t in layout["tensors"]),
        "hidden": int(meta.get("clip.vision.embedding_length", 0)),
        "ff": int(meta.get("clip.vision.feed_forward_length", 0)),
        "heads": int(meta.get("clip.vision.attention.head_count", 1)),
        "patch": int(meta.get("clip.vision.patch_size", 16)),
        "merge": int(meta.get("clip.vision.spatial_merge_size", 2)),
    }


def runtime(cfg: dict) -> dict:
    """llama.cpp context settings from the tier: tier.n_ctx is each persona's context; with a
    unified KV cache the pool is n_ctx x n_seq_max (Continuum's convention, FACTS.md)."""
    t = cfg["tier"]
    n_seq = int(t["n_seq_max"])
    return {"n_seq_max": n_seq, "n_ctx": int(t["n_ctx"]) * n_seq, "n_batch": int(t["n_batch"]),
            "n_ubatch": min(int(t["n_batch"]), 512), "kv_unified": bool(t["kv_unified"]),
            "cache_type_k": t["cache_type_k"], "cache_type_v": t["cache_type_v"],
            "max_image_px": int(t["max_image_px"]), "context_checkpoints": int(t["context_checkpoints"]),
            # What the GPU backend itself takes beyond llama.cpp's buffers (measured, conf/backend).
            "backend_runtime_bytes": int(cfg["backend"].get("runtime_overhead_mib", 0) * MiB)
            if cfg["backend"]["gpu"] else 0}


def vision_compute(vision: dict, image_px: int) -> int:
    """The encoder's compute buffer for a square image of this side. With flash attention there is
    no patches^2 score matrix; per patch, llama.cpp's allocator peaks at about 1.5 x (hidden + FFN)
    F32 values less a fixed 764 for real encoders, and at 10 x hidden for toy ones (hidden + FFN
    under 1024, where fixed per-patch buffers dominate) -- fitted to three measured
    projectors (demo 41.46 MiB, Qwen3.5-0.8B 161.31 MiB, 2B/4B 223.30 MiB at 1472 px on the CPU
    backend; scripts/bench_envelope.py), exact at those points within 1%."""
    patches = (image_px // vision["patch"]) ** 2
    width = vision["hidden"] + vision["ff"]
    per_patch = 1.5 * width - 764 if width >= 1024 else 10 * vision["hidden"]
    return int(patches * 4 * per_patch)


def estimate(text: dict, vision: dict | None, rt: dict, gpu: bool) -> list[dict]:
    """Every term of the memory a variant needs, with where it lives (gpu or host)."""
    n_ctx = _pad(rt["n_ctx"], KV_PAD)
    kv = n_ctx * text["n_attn_layers"] * text["n_head_kv"] * (
        text["key_length"] * BYTES[rt["cache_type_k"]] + text["value_length"] * BYTES[rt["cache_type_v"]])
    r = max(text["ssm_d_conv"] - 1, 0) * (text["ssm_d_inner"] + 2 * text["ssm_n_group"] * text["ssm_d_state"])
    s = text["ssm_d_state"] * text["ssm_d_inner"]
    rs_per_seq = text["n_recurrent_layers"] * (r + s) * 4
    # The input embedding stays in host memory (llama.cpp runs get_rows on the CPU); a tied output
    # head then needs its own copy on the GPU.
    emb = text["token_embd_bytes"]
    if gpu:
        w_host = emb
        w_gpu = text["weights_bytes"] - emb + (emb if text["tied_output"] else 0)
    else:
        w_host, w_gpu = text["weights_bytes"], 0
    n_ub = rt["n_ubatch"]
    # Worst-case graph: logits for a full ubatch plus the widest activations (FFN in and out).
    compute = n_ub * 4 * (text["n_vocab"] + 2 * text["n_ff"] + 2 * text["n_embd"])
    where = "gpu" if gpu else "host"
    terms = [
        {"id": "weights_gpu", "term": "weights (offloaded layers and output)", "where": "gpu", "bytes": w_gpu},
        {"id": "weights_host", "term": "weights (input embedding, host)", "where": "host", "bytes": w_host},
        {"id": "kv", "term": f"KV cache ({text['n_attn_layers']} full-attention layers x {n_ctx} cells)", "where": where,
         "bytes": int(kv)},
        {"id": "recurrent", "term": f"recurrent state ({text['n_recurrent_layers']} linear-attention layers x {rt['n_seq_max']} seq)",
         "where": where, "bytes": rs_per_seq * rt["n_seq_max"]},
        {"id": "output", "term": "output logits buffer", "where": "host", "bytes": text["n_vocab"] * 4 * rt["n_seq_max"]},
        {"id": "compute", "term": f"compute buffer (ubatch {n_ub})", "where": where, "bytes": compute},
        {"id": "checkpoints", "term": f"context checkpoints ({rt['context_checkpoints']} per seq)", "where": "host",
         "bytes": rt["context_checkpoints"] * rt["n_seq_max"] * rs_per_seq},
    ]
    if gpu and rt.get("backend_runtime_bytes"):
        terms.append({"id": "backend_runtime", "term": "backend runtime (context, library workspaces; conf/backend)",
                      "where": "gpu", "bytes": rt["backend_runtime_bytes"]})
    if vision:
        patches = (rt["max_image_px"] // vision["patch"]) ** 2
        v_compute = vision_compute(vision, rt["max_image_px"])
        terms += [
            {"id": "projector", "term": "projector weights", "where": where, "bytes": vision["weights_bytes"]},
            {"id": "vision_compute", "term": f"vision encoder compute ({rt['max_image_px']}px image, {patches} patches)", "where": where,
             "bytes": v_compute},
        ]
    return terms


def sensory_bytes(cfg: dict, gpu_only: bool = False) -> int:
    procs = cfg["sensory"]["processes"]
    return int(sum(p["memory_mb"] for p in procs if not gpu_only or p.get("gpu", True)) * 10**6)


def check(terms: list[dict], cfg: dict, model_file_bytes: int) -> dict:
    """The tier's rules against the estimate: every rule with its figure, limit and margin."""
    t = cfg["tier"]
    mem, budget = t["memory"], t["budget"]
    total = sum(x["bytes"] for x in terms)
    gpu_resident = sum(x["bytes"] for x in terms if x["where"] == "gpu")
    sensory = sensory_bytes(cfg)
    reference = mem["reference_gb"] * GiB
    rules = []

    def rule(name, figure, limit, kind="max"):
        ok = figure <= limit if kind == "max" else figure >= limit
        rules.append({"rule": name, "figure": int(figure), "limit": int(limit), "kind": kind, "passed": ok,
                      "margin": int(limit - figure) if kind == "max" else int(figure - limit)})

    if cfg["backend"]["gpu"]:
        # Unified memory: Metal's recommendedMaxWorkingSetSize already leaves the OS its share.
        # Discrete: the driver and display take os_reserve_gb of VRAM. Either way the sensory
        # processes that run on the GPU share the same working set.
        ws = mem["gpu_working_set_fraction"] * reference - (
            mem.get("os_reserve_gb", 0) * GiB if mem["kind"] == "discrete" else 0)
        rule("GPU working set: model and GPU sensory processes fit the GPU's share",
             gpu_resident + sensory_bytes(cfg, gpu_only=True), ws)
    if "model_max_gb" in budget:
        rule("model files <= model budget", model_file_bytes, budget["model_max_gb"] * GiB)
    if "sensory_max_gb" in budget:
        rule("sensory stack <= sensory budget", sensory, budget["sensory_max_gb"] * GiB)
    if "slack_min_gb" in budget:
        rule("slack on the reference machine", reference - total - sensory, budget["slack_min_gb"] * GiB, "min")
    if "total_max_gb" in budget:
        rule("model + sensory stack + OS within memory", total + sensory + mem.get("os_reserve_gb", 0) * GiB,
             budget["total_max_gb"] * GiB)
    return {"total_bytes": total, "gpu_resident_bytes": gpu_resident, "sensory_bytes": sensory,
            "rules": rules, "passed": all(r["passed"] for r in rules)}


def gb(n: int) -> str:
    return f"{n / GiB:8.3f} GiB"


def table(terms: list[dict], verdict: dict, title: str) -> str:
    lines = [title, f"  {'term':<66} {'where':<5} {'size':>12}"]
    for x in terms:
        lines.append(f"  {x['term']:<66} {x['where']:<5} {gb(x['bytes'])}")
    lines.append(f"  {'total':<66} {'':<5} {gb(verdict['total_bytes'])}")
    lines.append(f"  {'of which GPU-resident':<66} {'':<5} {gb(verdict['gpu_resident_bytes'])}")
    lines.append(f"  {'sensory stack (conf/sensory)':<66} {'':<5} {gb(verdict['sensory_bytes'])}")
    lines.append("  rules:")
    for r in verdict["rules"]:
        sign = "<=" if r["kind"] == "max" else ">="
        state = "ok " if r["passed"] else "FAIL"
        lines.append(f"    {state} {r['rule']}: {gb(r['figure']).strip()} {sign} {gb(r['limit']).strip()} "
                     f"({'spare' if r['passed'] else 'short by'} {gb(abs(r['margin'])).strip()})")
    return "\n".join(lines)


def side_by_side(text: dict, vision: dict | None, rt: dict, measured: dict) -> list[dict]:
    """Estimate on the CPU backend (where the measurement ran) against llama.cpp's own buffers."""
    cpu = {t["id"]: t["bytes"] for t in estimate(text, vision, rt, gpu=False)}
    b = measured["buffers_mib"]
    rows = [("weights", cpu["weights_gpu"] + cpu["weights_host"], b.get("model")),
            ("KV cache", cpu["kv"], b.get("KV")),
            ("recurrent state", cpu["recurrent"], b.get("RS")),
            ("output logits buffer", cpu["output"], b.get("output")),
            ("compute buffer", cpu["compute"], b.get("compute"))]
    p = measured.get("projector") or {}
    if vision and p.get("loaded"):
        rows.append(("projector weights", vision["weights_bytes"], p.get("weights_mib")))
        if p.get("warmup_px"):
            rows.append((f"vision encoder compute at {p['warmup_px']}px", vision_compute(vision, p["warmup_px"]),
                         p.get("compute_mib")))
    out = []
    for name, est, mib in rows:
        meas = None if mib is None else int(mib * MiB)
        err = None if not meas else round(100.0 * (est - meas) / meas, 2)
        out.append({"term": name, "estimate_bytes": int(est), "measured_bytes": meas, "error_pct": err})
    return out


def draft_term(draft_bytes: int, gpu: bool) -> dict:
    """convert.mtp=draft: the MTP head ships as a speculative-draft model loaded beside the text model;
    its weights (the head with the token embedding and output head it carries) count where the
    model's do. Its own KV cache and compute are small beside them and not estimated."""
    return {"id": "mtp_draft", "term": "multi-token-prediction draft weights (convert.mtp=draft)",
            "where": "gpu" if gpu else "host", "bytes": draft_bytes}
