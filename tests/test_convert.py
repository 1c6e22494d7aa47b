"""Conversion proven against transformers' LlamaForCausalLM: random tiny models saved by
transformers, converted with `convert --from hf` and from Meta-layout shards written here
independently (with the HF converter's permutation, reference §5.3), give transformers' logits;
`export --to hf` goes back to transformers with the same logits, EOT included."""

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from limajax import convert, sharding
from limajax.checkpoint import load_model_dir
from limajax.cli import main
from limajax.config import ModelConfig
from limajax.convert import config_from_meta

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# Tiny LlamaConfigs; every one is also expressible in Meta's params.json (head_dim = dim / N).
CASES = {
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2),
    "theta500k": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3.1": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                     rope_parameters=LLAMA3_ROPE),
    "tied": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                 tie_word_embeddings=True),
}
# head_dim: 16 (mha, theta500k, gqa), 32 (llama3.1, tied).
VOCAB = 256
LENGTHS = (13, 9, 4)  # a right-padded batch
OFFSET = 1000  # positions start here: long wavelengths (and Llama 3.1's scaling) matter


@pytest.fixture(scope="session")
def cli(cli):
    """conftest's cli(), with --no-tokenizer for convert: the checkpoints made here have none."""
    return lambda *args: cli(*(("convert", "--no-tokenizer", *args[1:])
                               if args[0] == "convert" else args))


def ok(result):
    """A CLI result that succeeded."""
    assert result.exit_code == 0, result.output
    return result


def hf_model(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(sorted(CASES).index(name))
    config = LlamaConfig(vocab_size=VOCAB, intermediate_size=96, num_hidden_layers=2,
                         max_position_embeddings=16384, rms_norm_eps=1e-5,
                         **{"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                            **CASES[name]})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so mistakes show in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
    for i, n in enumerate(LENGTHS):
        tokens[i, :n] = rng.integers(0, vocab, n)
    positions = np.broadcast_to(OFFSET + np.arange(tokens.shape[1]), tokens.shape)
    return tokens, np.ascontiguousarray(positions, np.int32)


def hf_logits(model, tokens, positions):
    mask = np.zeros_like(tokens)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions,
                                                                                 dtype=torch.long))
    return out.logits.numpy()


def our_logits(model_dir, tokens, positions):
    params, config, _ = load_model_dir(model_dir)
    model = sharding.model_from_params(config, params)
    return np.asarray(model(tokens, positions)), config


def assert_same_real_positions(ours, ref, vocab):
    for i, n in enumerate(LENGTHS):  # padding positions are not compared
        np.testing.assert_allclose(ours[i, :n, :vocab], ref[i, :n, :vocab], atol=1e-4, rtol=0)


# --- an independent Meta writer: the HF converter's mapping, inverted --------------------------

META_NAMES = [  # (HF name, Meta name, model-parallel split axis; None = replicated)
    ("model.embed_tokens.weight", "tok_embeddings.weight", 1),
    ("model.norm.weight", "norm.weight", None),
    ("lm_head.weight", "output.weight", 0),
]
LAYER_NAMES = [
    ("self_attn.q_proj", "attention.wq", 0), ("self_attn.k_proj", "attention.wk", 0),
    ("self_attn.v_proj", "attention.wv", 0), ("self_attn.o_proj", "attention.wo", 1),
    ("mlp.gate_proj", "feed_forward.w1", 0), ("mlp.down_proj", "feed_forward.w2", 1),
    ("mlp.up_proj", "feed_forward.w3", 0), ("input_layernorm", "attention_norm", None),
    ("post_attention_layernorm", "ffn_norm", None),
]


def unpermute(w, heads):
    """HF q/k rows (halves) -> Meta's interleaved pairs: inverse of convert_llama_weights_to_hf's
    permute, w.view(heads, dim1 // heads // 2, 2, dim2).transpose(1, 2)."""
    dim1, dim2 = w.shape
    return w.view(heads, 2, dim1 // heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_meta_independently(model, directory, n_shards):
    c = model.config
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    names = list(META_NAMES)
    for i in range(c.num_hidden_layers):
        names += [(f"model.layers.{i}.{h}.weight", f"layers.{i}.{m}.weight", axis)
                  for h, m, axis in LAYER_NAMES]
    shards = [{} for _ in range(n_shards)]
    for hf, meta, axis in names:
        w = sd[hf]
        if hf.endswith("q_proj.weight"):
            w = unpermute(w, c.num_attention_heads)
        if hf.endswith("k_proj.weight"):
            w = unpermute(w, c.num_key_value_heads)
        parts = [w] * n_shards if axis is None else torch.chunk(w, n_shards, axis)
        for shard, part in zip(shards, parts, strict=True):
            shard[meta] = part.clone()
    directory.mkdir(parents=True)
    for s, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{s:02d}.pth")
    theta = (c.rope_parameters or {}).get("rope_theta", 10000.0)
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers,
              "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
              "vocab_size": -1, "multiple_of": 96, "ffn_dim_multiplier": 96 / int(8 *
                                                                              c.hidden_size / 3),
              "norm_eps": c.rms_norm_eps, "rope_theta": theta}
    if (c.rope_parameters or {}).get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
    (directory / "params.json").write_text(json.dumps(params))


# --- fixtures: each case saved by transformers, converted once -----------------------------------


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name.replace(".", "_"))
    model = hf_model(name)
    model.save_pretrained(root / "hf")
    tokens, positions = batch(VOCAB)
    return {"name": name, "root": root, "model": model, "tokens": tokens,
            "positions": positions, "ref": hf_logits(model, tokens, positions)}


@pytest.fixture(scope="module")
def from_hf(case, cli):
    ok(cli("convert", "--from", "hf", "--input", case["root"] / "hf", "--output",
           case["root"] / "from_hf"))
    return case["root"] / "from_hf"


def test_convert_from_hf_gives_transformers_logits(case, from_hf):
    ours, config = our_logits(from_hf, case["tokens"], case["positions"])
    hf = case["model"].config
    assert config.vocab_size == VOCAB + 1  # EOT added
    assert config.tie_embeddings == hf.tie_word_embeddings
    assert config.head_dim == hf.hidden_size // hf.num_attention_heads
    assert_same_real_positions(ours, case["ref"], VOCAB)


@pytest.mark.parametrize("n_shards", [2, 4])
def test_convert_from_meta_shards_gives_transformers_logits(case, n_shards, cli):
    meta = case["root"] / f"meta{n_shards}"
    if not meta.exists():
        write_meta_independently(case["model"], meta, n_shards)
    out = case["root"] / f"from_meta{n_shards}"
    ok(cli("convert", "--from", "meta", "--input", meta, "--output", out, "--no-add-eot"))
    ours, config = our_logits(out, case["tokens"], case["positions"])
    assert config.vocab_size == VOCAB and config.ffn_dim == 96
    assert config.tie_embeddings == case["model"].config.tie_word_embeddings  # copy detected
    assert_same_real_positions(ours, case["ref"], VOCAB)


def test_export_to_hf_round_trip_with_eot(case, from_hf, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    ok(cli("export", "--to", "hf", "--model", from_hf, "--output", tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB + 1  # real vocabulary: EOT in, padding out
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # 4.x and 5.x
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    emb = exported.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(emb[VOCAB], emb[:VOCAB].mean(0), atol=1e-6)  # LIMA §3's EOT
    tokens, positions = case["tokens"].copy(), case["positions"]
    tokens[:, 2] = VOCAB  # EOT as an input too
    ours, _ = our_logits(from_hf, tokens, positions)
    assert_same_real_positions(ours, hf_logits(exported, tokens, positions), VOCAB + 1)


def test_write_meta_matches_the_independent_writer(tmp_path):
    model = hf_model("gqa")
    model.save_pretrained(tmp_path / "hf")
    write_meta_independently(model, tmp_path / "reference", 4)
    converted = convert.read_hf(tmp_path / "hf", add_eot=False, no_tokenizer=True)
    (tmp_path / "ours").mkdir()
    convert.write_meta(tmp_path / "ours", converted.params, converted.config, n_shards=4)
    for s in range(4):
        want = torch.load(tmp_path / "reference" / f"consolidated.{s:02d}.pth", weights_only=True)
        got = torch.load(tmp_path / "ours" / f"consolidated.{s:02d}.pth", weights_only=True)
        assert sorted(got) == sorted(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    again = convert.read_meta(tmp_path / "ours", add_eot=False, no_tokenizer=True).config
    # Meta's params.json has no context length and spells the FFN size by its rule.
    c = converted.config
    assert again.replace(multiple_of=c.multiple_of, ffn_dim_multiplier=None,
                         ffn_dim=again.ffn_dim, max_seq_len=c.max_seq_len) == c


def test_meta_rotary_permutation_is_the_hf_converters():
    """Meta rows (interleaved pairs) -> our kernel == HF's permute(w).T (reference §5.3)."""
    n, h, d = 3, 8, 5
    config = ModelConfig(dim=d, n_layers=1, n_heads=n, head_dim=h, vocab_size=4, multiple_of=4)
    meta = torch.randn(n * h, d)
    hf = meta.view(n, h // 2, 2, d).transpose(1, 2).reshape(n * h, d)  # the HF converter
    params = convert.allocate(config)
    wq = next(w for w in convert.WEIGHTS if w.ours.endswith("wq/kernel"))
    convert.place(params, wq, 0, meta.numpy(), wq.meta_layout, convert.sizes_for(config, 4))
    ours = params["layers"]["attention"]["wq"]["kernel"][0]  # [D, N, H]
    np.testing.assert_array_equal(ours.reshape(d, n * h), hf.numpy().T)


def test_hf_config_4x_and_5x_layouts_agree():
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
            "vocab_size": 100, "max_position_embeddings": 16384}
    v5 = convert.config_from_hf({**base, "rope_parameters": LLAMA3_ROPE}, "config.json")
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    v4 = convert.config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": scaling},
                                "config.json")
    legacy = convert.config_from_hf(
        {**base, "rope_theta": 500000.0, "rope_scaling": {**scaling, "type": "llama3"}},
        "config.json")
    assert v5 == v4 == legacy
    assert v5.rope_theta == 500000.0 and v5.rope_scaling.factor == 8.0
    plain = convert.config_from_hf({**base, "rope_theta": 10000.0}, "config.json")
    assert plain.rope_scaling is None and plain.rope_theta == 10000.0


# --- bad input: one line naming the file or tensor, exit 2, nothing in --output ------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = hf_model("gqa")
    model.save_pretrained(root / "hf")
    write_meta_independently(model, root / "meta", 4)
    return root


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_user_error(result, output, *words):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


def test_missing_shard(sources, tmp_path, cli):
    meta = copy(sources / "meta", tmp_path / "meta")
    (meta / "consolidated.01.pth").unlink()
    out = tmp_path / "out"
    assert_user_error(cli("convert", "--from", "meta", "--input", meta, "--output", out), out,
                      "consolidated.01.pth", "missing")


def test_missing_last_shard(sources, tmp_path, cli):
    meta = copy(sources / "meta", tmp_path / "meta")
    (meta / "consolidated.03.pth").unlink()  # no gap to see: the split sizes tell (R8)
    out = tmp_path / "out"
    assert_user_error(cli("convert", "--from", "meta", "--input", meta, "--output", out), out,
                      "consolidated.03.pth: missing shard", "into 4 shards; found 3")


def test_convert_without_a_tokenizer_needs_no_tokenizer(sources, tmp_path):
    out = tmp_path / "models" / "deeper" / "out"  # parents made for it go again (issue 17)
    for source in ("meta", "hf"):
        r = CliRunner().invoke(main, ["convert", "--from", source, "--input",
                                      str(sources / source), "--output", str(out)])
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert "no tokenizer.model" in lines[0] and "--no-tokenizer" in lines[0]
        assert list(tmp_path.iterdir()) == []


def test_meta_context_guess_is_said(fixtures, tmp_path):
    """stories260K was trained at 512; Meta's params.json does not say so, and the family's 4,096
    is a guess the command says it made (issue 17 item 8)."""
    stories = fixtures / "stories260K"
    args = ["convert", "--from", "meta", "--input", stories / "meta_layout", "--tokenizer",
            stories / "tok512.model"]

    def cli(*a):
        return CliRunner().invoke(main, [str(x) for x in a])

    r = cli(*args, "--output", tmp_path / "guess")
    assert r.exit_code == 0, r.output
    assert ("notice: context 4,096 is the Llama-2 family's (Meta's params.json does not state "
            "it); pass --max-seq-len N") in r.stderr
    r = cli(*args, "--output", tmp_path / "given", "--max-seq-len", "512")
    assert r.exit_code == 0 and "notice: context" not in r.stderr, r.output


@pytest.mark.parametrize("params, family, length", [
    (dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6), "LLaMA-1", 2048),
    (dict(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5), "LLaMA-1", 2048),
    (dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5), "Llama-2", 4096),
    (dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, norm_eps=1e-5), "Llama-2", 4096),
    (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, rope_theta=500000.0), "Llama-3",
     8192),
    (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, rope_theta=500000.0,
          use_scaled_rope=True), "Llama-3.1", 131072),
])
def test_meta_context_length_is_the_familys(params, family, length):
    """Meta's params.json never states the context length: each family's is set (R7)."""
    from limajax.convert.meta import meta_family

    assert meta_family(params) == (family, length)
    assert config_from_meta(params, 32000, Path("params.json")).max_seq_len == length
    assert config_from_meta(params, 32000, Path("params.json"), 1024).max_seq_len == 1024


def test_overwrite_replaces_only_the_same_commands_output(sources, tmp_path, cli):
    """--overwrite replaces what an earlier run of the same command made, nothing else (F1), and
    outputs are readable by others as the umask says (not owner-only)."""
    old_umask = os.umask(0o022)
    try:
        model, hf = tmp_path / "model", tmp_path / "hf"
        ok(cli("convert", "--from", "hf", "--input", sources / "hf", "--output", model))
        ok(cli("export", "--to", "hf", "--model", model, "--output", hf))
        download = copy(sources / "meta", tmp_path / "download")  # Meta's own files
        for target, output in (("meta", download), ("hf", model)):
            before = sorted(p.name for p in output.iterdir())
            r = cli("export", "--to", target, "--model", model, "--output", output, "--overwrite")
            assert r.exit_code == 2 and f"not an earlier output of `limajax export --to " \
                f"{target}`" in r.output, r.output
            assert sorted(p.name for p in output.iterdir()) == before
        ok(cli("export", "--to", "hf", "--model", model, "--output", hf, "--overwrite"))
        assert stat.S_IMODE(hf.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in hf.iterdir()} == {0o644}
    finally:
        os.umask(old_umask)


def test_demo_overwrite_refuses_a_directory_it_did_not_make(tmp_path, cli):
    (tmp_path / "thesis.tex").write_text("mine")
    r = cli("demo", "--workdir", tmp_path, "--overwrite")
    assert r.exit_code == 2 and "not an earlier output of `limajax demo`" in r.output, r.output
    assert (tmp_path / "thesis.tex").read_text() == "mine"


def test_shards_of_mismatched_shapes(sources, tmp_path, cli):
    meta = copy(sources / "meta", tmp_path / "meta")
    shard = torch.load(meta / "consolidated.02.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = torch.zeros(128, 48)
    torch.save(shard, meta / "consolidated.02.pth")
    out = tmp_path / "out"
    assert_user_error(cli("convert", "--from", "meta", "--input", meta, "--output", out), out,
                      "consolidated.02.pth", "layers.1.feed_forward.w2.weight", "[128, 48]")


def test_params_json_disagreeing_with_the_weights(sources, tmp_path, cli):
    meta = copy(sources / "meta", tmp_path / "meta")
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    out = tmp_path / "out"
    assert_user_error(cli("convert", "--from", "meta", "--input", meta, "--output", out), out,
                      "layers.0.attention.wk.weight", "params.json disagrees")


def test_unsafe_pickle_is_refused(sources, tmp_path, cli):
    meta = copy(sources / "meta", tmp_path / "meta")
    torch.save({"x": shutil.copy}, meta / "consolidated.00.pth")  # a callable: code, not data
    out = tmp_path / "out"
    assert_user_error(cli("convert", "--from", "meta", "--input", meta, "--output", out), out,
                      "consolidated.00.pth", "cannot be read")


def test_unsupported_architecture(sources, tmp_path, cli):
    hf = copy(sources / "hf", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_user_error(cli("convert", "--from", "hf", "--input", hf, "--output", out), out,
                      "config.json", "MistralForCausalLM")


def test_truncated_safetensors(sources, tmp_path, cli):
    hf = copy(sources / "hf", tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    assert_user_error(cli("convert", "--from", "hf", "--input", hf, "--output", out), out,
                      "model.safetensors", "interrupted")


def test_existing_output_needs_overwrite(sources, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    result = cli("convert", "--from", "hf", "--input", sources / "hf", "--output", out)
    assert result.exit_code == 2 and "--overwrite" in result.output, result.output
    # --overwrite replaces an earlier output, never a directory of other files.
    result = cli("convert", "--from", "hf", "--input", sources / "hf", "--output", out,
                 "--overwrite")
    assert result.exit_code == 2 and "not an earlier output of `limajax convert`" in \
        result.output, result.output
    assert (out / "precious.txt").read_text() == "mine"
    (out / "precious.txt").unlink()
    ok(cli("convert", "--from", "hf", "--input", sources / "hf", "--output", out, "--overwrite"))
    ok(cli("convert", "--from", "hf", "--input", sources / "hf", "--output", out, "--overwrite",
           "--no-add-eot"))
    assert json.loads((out / "tokens.json").read_text())["eot_id"] is None


def test_a_dead_processs_hidden_partial_output_is_removed(sources, tmp_path, cli):
    """A killed convert leaves .NAME.HOST~PID.….partial; the next one removes it (F6), but not a
    live process's or another host's."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname().replace(".", "_")
    stale = tmp_path / f".out.{host}~{dead.pid}.x1y2.partial"
    live = tmp_path / f".out.{host}~{os.getpid()}.x1y2.partial"
    other = tmp_path / f".out.elsewhere~{dead.pid}.x1y2.partial"
    for d in (stale, live, other):
        (d / "params").mkdir(parents=True)
    r = ok(cli("convert", "--from", "hf", "--input", sources / "hf", "--output", tmp_path / "out"))
    assert not stale.exists() and live.exists() and other.exists()
    # Progress as plain lines (stderr is not a terminal here): a quarter at a time, no \r.
    assert "convert: 21/21 tensors" in r.stderr and r.stderr.count("convert: ") == 4
    assert "\r" not in r.stderr
