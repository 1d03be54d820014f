"""draft-run: the variant's text GGUF and its MTP draft GGUF loaded together and decoded through, as
the product serves them (llama-server `--spec-type draft-mtp --spec-draft-model`; here the pinned
llama-speculative-simple, which parses the same options into the same common/speculative.cpp), before
the draft is receipted. Greedy, so the speculative decode must give the text the model gives alone
(decoded through the binding, one token at a time): the draft may only change the speed, never the
words. Gated: the pair loads, the draft proposes tokens, the target accepts or rejects them to the end.
Reported: the acceptance rate (a random-weight head's is noise; a real head's is its speed-up), and
whether the text equals the plain decode (gated where the source sees: on random weights near-tied
logits may order differently between a batch of draft tokens and one token at a time)."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

from ..errors import ForgeError
from ..runlog import run_json
from ..toolchain import tool
from .kld import threads

TIMEOUT_S = 1800
# The tool's summary lines (LOG_INF, to stderr, after a timestamp): name in the report -> pattern.
STATS = {"n_draft_max": r"\bn_draft\s*=\s*(\d+)$", "n_predict": r"\bn_predict\s*=\s*(\d+)$",
         "n_drafted": r"\bn_drafted\s*=\s*(\d+)$", "n_accept": r"\bn_accept\s*=\s*(\d+)$"}


def parse(stderr: str) -> dict:
    stats = {}
    for name, pattern in STATS.items():
        m = re.search(pattern, stderr, re.M)
        if m:
            stats[name] = int(m.group(1))
    return stats


def first_error(stderr: str) -> str:
    """llama.cpp's first error line (after its timestamp, level E), else the last line."""
    lines = stderr.strip().splitlines() or ["(no output)"]
    errors = [l for l in lines if re.match(r"^[\d.]+ E ", l) or l.startswith(("error", "llama_model_load: error"))]
    return re.sub(r"^[\d.]+ E ", "", (errors or lines[-1:])[0])[:400]


def speculative(text, draft, p: dict, log) -> tuple[str, dict, str]:
    """Decode the prompt greedily with the draft; the generated text (stdout after the echoed
    prompt), the tool's figures, and its stderr."""
    # Every layer of both on the GPU where there is one (smoke.gpu: auto/required), as served.
    ngl = "0" if p["gpu"] == "off" else "99"
    cmd = [str(tool("llama-speculative-simple")), "-m", str(text), "--spec-draft-model", str(draft),
           "--spec-type", "draft-mtp", "--spec-draft-n-max", str(p["draft_max"]),
           "-p", p["prompt"], "-n", str(p["n_predict"]), "-c", str(p["n_ctx"]),
           "--temp", "0", "--top-k", "1", "--seed", "0", "-ngl", ngl, "--spec-draft-ngl", ngl,
           "-t", str(threads())]
    log.write("$ " + " ".join(cmd))
    log("decode with the MTP draft (llama-speculative-simple --spec-type draft-mtp)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ForgeError(f"the speculative decode with the draft did not finish in {TIMEOUT_S} s",
                         where=str(draft)) from None
    log.write(proc.stderr[-20000:])
    log.write("stdout: " + proc.stdout[-4000:])
    if proc.returncode != 0:
        raise ForgeError(f"the text model and its MTP draft did not load and decode together "
                         f"(llama-speculative-simple exit {proc.returncode})", where=str(draft),
                         found=first_error(proc.stderr),
                         hint="the draft's log is in the step's log")
    return proc.stdout, parse(proc.stderr), proc.stderr


def plain(text, p: dict, log) -> dict:
    """The same prompt decoded by the text model alone, one token at a time (a subprocess: a crash of
    the binding is a step failure with its output, not the build's)."""
    args = json.dumps({k: p[k] for k in ("prompt", "n_predict", "n_ctx", "gpu")} | {"threads": threads()})
    return run_json(["compiler.stages.draft_run", text, args], log, "the plain greedy decode of the text model crashed",
                    str(text))


def judge(report: dict, sees: bool) -> list[str]:
    """What fails the draft (empty: it passed); marks what was gated. Pure."""
    s = report["stats"]
    report["same_as_plain_gated"] = sees
    problems = []
    if s.get("n_predict", 0) < 1:
        problems.append("the speculative decode produced no token")
    if s.get("n_drafted", 0) < 1:
        problems.append("the draft proposed no token (was it loaded as an MTP head?)")
    if sees and not report["same_as_plain"]:
        problems.append("the text decoded with the draft differs from the model's own greedy decode")
    return problems


def run(step, out, inputs, log, ctx):
    p = step.params
    text, draft = inputs["text"].output(), inputs["draft"].output()
    stdout, stats, stderr = speculative(text, draft, p, log)
    alone = plain(text, p, log)
    # stdout: "\n\n", the prompt's pieces, the generated pieces, "\n\n".
    body = stdout.strip("\n")
    generated = body[len(alone["prompt_text"]):] if body.startswith(alone["prompt_text"]) else None
    if generated is None:
        raise ForgeError("the speculative decode did not echo the prompt as the model tokenizes it",
                         where=str(text), found=body[:200])
    # The tool may pass n_predict by up to a draft's length: compare over the shorter text.
    n = min(len(generated), len(alone["text"]))
    same = generated[:n] == alone["text"][:n] and n > 0
    accept = stats["n_accept"] / stats["n_drafted"] if stats.get("n_drafted") else None
    report = {"stats": stats, "acceptance": accept, "same_as_plain": same,
              "compared_chars": n, "text_sha256": hashlib.sha256(generated.encode()).hexdigest(),
              "plain_tokens": alone["tokens"], "prompt": p["prompt"],
              # where it ran, not what the configuration names: a CPU build decodes on the CPU
              "backend": p["backend"] if alone["on_gpu"] else "cpu",
              # the target rolls a rejected draft back by restoring a saved state (recurrent layers)
              "target_restores_state": "speculative decoding will use checkpoints" in stderr}
    problems = judge(report, p["sees"])
    log(f"draft: {stats.get('n_drafted')} tokens drafted, {stats.get('n_accept')} accepted "
        f"({'-' if accept is None else f'{accept:.1%}'}), {stats.get('n_predict')} decoded; text "
        f"{'equal to' if same else 'DIFFERENT from'} the plain greedy decode over {n} characters "
        f"({'gated' if p['sees'] else 'random weights: reported, not gated'})")
    out.path("draft.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if problems:
        raise ForgeError("the MTP draft failed: " + "; ".join(problems), where=step.task,
                         hint="the speculative decode's log is in the step's log")


def _plain_main(text: str, args: str) -> None:
    """Greedy decode with the binding's low-level API; prints {prompt_text, text, tokens} as JSON."""
    import ctypes

    import llama_cpp as ll
    import numpy as np

    p = json.loads(args)

    @ll.llama_log_callback
    def warnings_only(level, text, _user):  # ggml's WARN and ERROR; its graph tables are noise here
        if level in (3, 4):
            sys.stderr.write(text.decode("utf-8", "replace"))

    ll.llama_log_set(warnings_only, ctypes.c_void_p())
    ll.llama_backend_init()
    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = 0 if p["gpu"] == "off" else 999
    model = ll.llama_model_load_from_file(text.encode(), mp)
    if not model:
        raise SystemExit(f"could not load {text}")
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch = p["n_ctx"], p["n_ctx"]
    cp.n_threads = cp.n_threads_batch = int(p["threads"])
    lctx = ll.llama_init_from_model(model, cp)
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)

    def piece(tok: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = ll.llama_token_to_piece(vocab, tok, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]

    raw = p["prompt"].encode()
    ids = (ll.llama_token * (len(raw) + 8))()
    n = ll.llama_tokenize(vocab, raw, len(raw), ids, len(ids), True, True)
    prompt = list(ids[:n])
    out, tokens = b"", []
    # the batch points into these arrays: each is kept referenced until its decode has run
    held = (ll.llama_token * len(prompt))(*prompt)
    batch = ll.llama_batch_get_one(held, len(prompt))
    for _ in range(p["n_predict"]):
        if ll.llama_decode(lctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(lctx, -1), shape=(n_vocab,))
        tok = int(np.argmax(logits))
        if ll.llama_vocab_is_eog(vocab, tok):
            break
        tokens.append(tok)
        out += piece(tok)
        held = (ll.llama_token * 1)(tok)
        batch = ll.llama_batch_get_one(held, 1)
    prompt_text = b"".join(piece(t) for t in prompt)
    print(json.dumps({"prompt_text": prompt_text.decode("utf-8", "replace"),
                      "on_gpu": p["gpu"] != "off" and bool(ll.llama_supports_gpu_offload()),
                      "text": out.decode("utf-8", "replace"), "tokens": len(tokens)}))


if __name__ == "__main__":
    _plain_main(sys.argv[1], sys.argv[2])
