"""Write a random-weight llama-architecture GGUF (F16) for GPU smoke tests: no download, no checkpoint.

    python3 scripts/gpu/tiny_gguf.py OUT.gguf [--embd 1024 --layers 8 --ff 2816 --vocab 32000]

The vocabulary is SentencePiece-style: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then
filler pieces, so llama.cpp's vocab loader (which needs <0x0A>) accepts it. Seeded: same bytes each run.
"""
import argparse

import numpy as np
import gguf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ff", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ctx", type=int, default=4096)
    a = ap.parse_args()
    rng = np.random.default_rng(1234)
    head_dim = a.embd // a.heads
    kv = a.kv_heads * head_dim

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("forge-gpu-smoke-random")
    w.add_context_length(a.ctx)
    w.add_embedding_length(a.embd)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ff)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"\u2581w{i}" for i in range(a.vocab - len(toks))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (a.vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([-float(i) for i in range(a.vocab)])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(name, *shape, std=0.02):
        w.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16))

    def ones(name, n):
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    t("token_embd.weight", a.vocab, a.embd)
    for i in range(a.layers):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", a.embd)
        t(p + "attn_q.weight", a.embd, a.embd)
        t(p + "attn_k.weight", kv, a.embd)
        t(p + "attn_v.weight", kv, a.embd)
        t(p + "attn_output.weight", a.embd, a.embd)
        ones(p + "ffn_norm.weight", a.embd)
        t(p + "ffn_gate.weight", a.ff, a.embd)
        t(p + "ffn_up.weight", a.ff, a.embd)
        t(p + "ffn_down.weight", a.embd, a.ff)
    ones("output_norm.weight", a.embd)
    t("output.weight", a.vocab, a.embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
